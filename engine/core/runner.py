"""Runs one scheduled step: builds the batch, runs the model, samples. Makes no policy.

``launch`` queues a step on the device and returns a handle at once; the step's sampled ids
stay on the device, where the next launch reads them as its input ids. ``StepHandle.resolve``
waits for the results (one wait a step). On the CPU the work is done inside ``launch``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.core.batch import StepInputs, build_step_inputs
from engine.core.scheduler import ScheduledSeq, SchedulerOutput
from engine.lora.peft import LoraAdapter
from engine.model.cuda_graphs import DecodeGraphConfig, DecodeGraphs
from engine.model.llama import KVCache, LlamaModel
from engine.model.lora.slots import LoraSlots
from engine.model.step_graphs import StepGraphs
from engine.outputs import TokenLogprob
from engine.progress import timed_stage
from engine.sampling.sampler import DeviceSample, Sampler, SamplingRow
from engine.structured.matchers import StepGrammars
from engine.transfer import HostFetch, to_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampledTokens:
    """What one step accepted for one sequence: its new tokens in order (one today; a step
    that verifies draft tokens may accept several) and, when asked, their logprobs."""

    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None


@dataclass(frozen=True)
class StepResult:
    # One entry per SchedulerOutput.scheduled, in order: the new tokens, or None for a
    # prefill chunk that did not reach the end of the sequence.
    sampled: tuple[SampledTokens | None, ...]
    # seq_id -> logprobs of the prompt tokens predicted in this step's chunk, in order
    # (entry k is for prompt token start + k + 1).
    prompt_logprobs: dict[int, list[TokenLogprob]]


@dataclass(frozen=True)
class _PromptLogprobs:
    """One sequence's prompt logprobs of a step, still on the device."""

    seq_id: int
    targets: list[int]  # the prompt tokens predicted, in order
    k: int


class StepHandle:
    """A launched step. Its results are on their way to the host (one HostFetch); ``resolve``
    waits for them, the step's only wait for the device."""

    def __init__(self, out: SchedulerOutput, sampling_seq_indices: list[int],
                 sample: DeviceSample | None, prompt: list[_PromptLogprobs],
                 prompt_tensors: list[torch.Tensor]) -> None:
        self.out = out
        self._indices = sampling_seq_indices
        self._sample = sample
        self._prompt = prompt
        self._num_sample_tensors = len(sample.tensors()) if sample is not None else 0
        self._fetch = HostFetch((sample.tensors() if sample is not None else [])
                                + prompt_tensors)

    def resolve(self) -> StepResult:
        host = self._fetch.wait()
        sampled: list[SampledTokens | None] = [None] * len(self.out.scheduled)
        if self._sample is not None:
            result = self._sample.resolve(host[:self._num_sample_tensors])
            for i, token_id, logprob in zip(self._indices, result.token_ids, result.logprobs,
                                            strict=True):
                sampled[i] = SampledTokens((token_id,), None if logprob is None else (logprob,))
        prompt_logprobs: dict[int, list[TokenLogprob]] = {}
        rest = host[self._num_sample_tensors:]
        for j, p in enumerate(self._prompt):
            chosen, top_values, top_ids = (t.tolist() for t in rest[3 * j:3 * j + 3])
            prompt_logprobs[p.seq_id] = [
                TokenLogprob(int(t), float(c), tuple(zip(ids, vals, strict=True)))
                for t, c, ids, vals in zip(p.targets, chosen, top_ids, top_values, strict=True)]
        return StepResult(tuple(sampled), prompt_logprobs)


@dataclass(frozen=True)
class _Previous:
    """The last launched step's sampled ids, still on the device: the next step's input for
    every sequence it sampled."""

    token_ids: torch.Tensor  # [S] int64
    rows: dict[int, int]  # seq_id -> row of token_ids


def kv_bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                       dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element


def allocate_kv_caches(model: LlamaModel, num_blocks: int, block_size: int) -> list[KVCache]:
    arch = model.arch
    shape = (num_blocks, block_size, arch.num_kv_heads, arch.head_dim)
    return [(torch.zeros(shape, dtype=model.dtype, device=model.device),
             torch.zeros(shape, dtype=model.dtype, device=model.device))
            for _ in range(arch.num_layers)]


class ModelRunner:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int,
                 eos_token_id: int, vocab_size: int, seed: int,
                 graphs: DecodeGraphConfig | None = None) -> None:
        self.model = model
        self.block_size = block_size
        self.eos_token_id = eos_token_id
        # With decode graphs, one block past the pool (never handed out by the block manager)
        # takes the K/V writes of padding rows.
        extra = 0 if graphs is None else 1
        start = time.monotonic()
        self.kv_caches = allocate_kv_caches(model, num_blocks + extra, block_size)
        timed_stage(log, "KV cache", start, f"{num_blocks} blocks allocated on {model.device}")
        self.graphs: DecodeGraphs | None = None
        if graphs is not None:
            self.graphs = DecodeGraphs(model, self.kv_caches, graphs, block_size,
                                       sink_slot=num_blocks * block_size)
            self.graphs.capture()
        self.step_graphs: StepGraphs | None = None
        if graphs is not None and graphs.step_max_tokens > 0:
            self.step_graphs = StepGraphs(model, self.kv_caches, graphs.step_max_tokens,
                                          sink_slot=num_blocks * block_size)
            self.step_graphs.capture()
        # The model's adapter slots and the host copies of every loaded adapter (LoRA on).
        self.lora_slots: LoraSlots | None = None
        if model.lora is not None:
            self.lora_slots = LoraSlots(model.lora_sites, model.lora.max_loras, model.dtype,
                                        model.device)
        self.sampler = Sampler(vocab_size, seed=seed)
        self.vocab_size = vocab_size
        # Per-request generators for seeded sampling, keyed by seq_id; released on finish.
        self._generators: dict[int, torch.Generator] = {}
        self._previous: _Previous | None = None

    def warm_up_attention(self) -> None:
        """The attention backend's own warm-up, on the first layer's cache (every layer's has
        the same shape, strides and alignment)."""
        k_cache, v_cache = self.kv_caches[0]
        self.model.attention_backend.warm_up(k_cache, v_cache, self.model.arch.num_heads)

    def add_lora(self, adapter_id: int, adapter: LoraAdapter) -> None:
        assert self.lora_slots is not None, "LoRA is off"
        self.lora_slots.add(adapter_id, adapter)

    def drop_lora(self, adapter_id: int) -> None:
        if self.lora_slots is not None:
            self.lora_slots.remove(adapter_id)

    def step_inputs(self, out: SchedulerOutput,
                    previous_rows: dict[int, int] | None = None) -> StepInputs:
        """The step's tensors, its adapters made resident first (each row's slot)."""
        lora = self.model.lora
        if self.lora_slots is None or lora is None:
            return build_step_inputs(out, self.block_size, self.model.device, previous_rows)
        placed = self.lora_slots.prepare(s.seq.lora.id for s in out.scheduled
                                         if s.seq.lora is not None)
        slots = [-1 if s.seq.lora is None else placed[s.seq.lora.id] for s in out.scheduled]
        return build_step_inputs(out, self.block_size, self.model.device, previous_rows,
                                 slots, lora.max_loras, lora.kernels.reads_groups)

    def launch(self, out: SchedulerOutput,
               side_inputs: Callable[[], StepGrammars | None] | None = None) -> StepHandle:
        """Queue one step on the device and return at once (on the CPU the work is done by
        then). A sequence whose last token the previous launch sampled reads it on the
        device: the caller must resolve every older step before launching this one.

        ``side_inputs`` is called once the forward pass is queued, before sampling: it returns
        the constrained sequences' matchers (a per-row side input of the step; None when no
        sampling sequence has one), whose masks are then computed on the host while the device
        runs the forward pass."""
        previous = self._previous
        inputs = self.step_inputs(out, previous.rows if previous is not None else None)
        prev_ids = previous.token_ids if previous is not None else None
        inputs.feed_pending(prev_ids)
        if self._use_graph(out, inputs):
            assert self.graphs is not None
            # One row per sequence: the graph's logits are already per sequence.
            step_logits = self.graphs.run(inputs.input_ids, inputs.positions, inputs.meta,
                                          inputs.lora)
            prompt: list[_PromptLogprobs] = []
            prompt_tensors: list[torch.Tensor] = []
        else:
            hidden = self.forward(inputs)  # [T, hidden]
            prompt, prompt_tensors = self._prompt_logprobs(out, inputs, hidden)
            step_logits = None
        sample = None
        self._previous = None
        if inputs.sampling_seq_indices:
            if step_logits is not None:
                logits = step_logits[inputs.logits_indices]  # [S, V]
            else:
                logits = self.model.compute_logits(hidden[inputs.logits_indices])  # [S, V]
            # The side inputs first: building them may deliver the step before (making its
            # tokens known), and the rows must see each sequence as it is after that.
            grammars = side_inputs() if side_inputs is not None else None
            rows = [self._sampling_row(out.scheduled[i], previous)
                    for i in inputs.sampling_seq_indices]
            masks = (None if grammars is None
                     else grammars.masks_for(inputs.sampling_seq_indices))
            sample = self.sampler.sample(logits, rows, prev_ids, masks)
            self._previous = _Previous(sample.token_ids, {
                out.scheduled[i].seq.seq_id: row
                for row, i in enumerate(inputs.sampling_seq_indices)})
        elif side_inputs is not None:
            side_inputs()
        return StepHandle(out, inputs.sampling_seq_indices, sample, prompt, prompt_tensors)

    def forward(self, inputs: StepInputs) -> torch.Tensor:
        """A step's final hidden states [T, hidden] without the decode graphs: through the step
        graphs when the step fits one and has no LoRA rows (their buffer, valid until the next
        replay), else eagerly."""
        if (self.step_graphs is not None and inputs.lora is None
                and self.step_graphs.bucket_for(inputs.input_ids.shape[0]) is not None):
            return self.step_graphs.run(inputs.input_ids, inputs.positions, inputs.meta)
        return self.model.forward(inputs.input_ids, inputs.positions, self.kv_caches,
                                  inputs.meta, inputs.lora)

    def run(self, out: SchedulerOutput, grammars: StepGrammars | None = None) -> StepResult:
        """Launch a step and wait for it (no step may be pending)."""
        return self.launch(out, lambda: grammars).resolve()

    def _use_graph(self, out: SchedulerOutput, inputs: StepInputs) -> bool:
        """Decode-only steps that fit a captured batch size, unless a row (a one-token prefill
        chunk) owes prompt logprobs, which need the hidden states the graph does not return."""
        if self.graphs is None or not inputs.meta.decode_only:
            return False
        if self.graphs.bucket_for(inputs.meta.num_seqs) is None:
            return False
        if inputs.lora is not None and not self.graphs.captures_lora:
            return False
        return not any(s.seq.params.prompt_logprobs is not None
                       and s.start < s.seq.num_prompt_tokens - 1 for s in out.scheduled)

    def release(self, seq_id: int) -> None:
        self._generators.pop(seq_id, None)

    def _sampling_row(self, s: ScheduledSeq, previous: _Previous | None) -> SamplingRow:
        seq = s.seq
        pending_src = None
        if seq.num_pending_tokens:
            assert seq.num_pending_tokens == 1 and previous is not None
            pending_src = previous.rows[seq.seq_id]
        params = seq.params
        generator = None
        # A sequence that ended while this step was built samples a token that is dropped:
        # it gets no generator of its own (one would outlive its release).
        if params.seed is not None and not seq.is_finished:
            generator = self._generators.get(seq.seq_id)
            if generator is None:
                generator = torch.Generator(device=self.model.device)
                generator.manual_seed(params.seed)
                self._generators[seq.seq_id] = generator
        suppress: tuple[int, ...] = ()
        if seq.num_output_tokens < params.min_tokens:
            suppress = (self.eos_token_id, *params.stop_token_ids)
        return SamplingRow(params=params, prompt_token_ids=seq.prompt_token_ids,
                           output_token_ids=seq.output_token_ids, generator=generator,
                           suppress_token_ids=suppress, pending_src=pending_src)

    def _prompt_logprobs(self, out: SchedulerOutput, inputs: StepInputs, hidden: torch.Tensor
                         ) -> tuple[list[_PromptLogprobs], list[torch.Tensor]]:
        """Logprobs of prompt tokens for sequences that asked (echo with logprobs), left on
        the device: per sequence its chosen logprobs [n], top values and ids [n, k]."""
        specs: list[_PromptLogprobs] = []
        tensors: list[torch.Tensor] = []
        for i, s in enumerate(out.scheduled):
            seq = s.seq
            k = seq.params.prompt_logprobs
            start = s.start
            # Row p predicts token p + 1; only prompt tokens are of interest.
            end = min(start + s.num_new_tokens, seq.num_prompt_tokens - 1)
            if k is None or start >= end:
                continue
            row0 = inputs.meta.query_start_loc_cpu[i]
            logits = self.model.compute_logits(hidden[row0:row0 + end - start])
            logprobs = torch.log_softmax(logits[:, :self.vocab_size].float(), dim=-1)  # [n, V]
            targets = seq.prompt_token_ids[start + 1:end + 1]
            target_ids = to_device(torch.tensor(targets), logprobs.device).unsqueeze(1)  # [n, 1]
            chosen = logprobs.gather(1, target_ids).squeeze(1)  # [n]
            top_vals, top_ids = (logprobs.topk(k, dim=-1) if k > 0
                                 else (logprobs[:, :0], logprobs[:, :0].long()))  # [n, k]
            specs.append(_PromptLogprobs(seq.seq_id, targets, k))
            tensors += [chosen, top_vals, top_ids]
        return specs, tensors
