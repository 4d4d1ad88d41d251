"""Runs one scheduled step: builds the batch, runs the model, samples. Makes no policy."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from engine.core.batch import StepInputs, build_step_inputs
from engine.core.scheduler import ScheduledSeq, SchedulerOutput
from engine.lora.peft import LoraAdapter
from engine.model.cuda_graphs import DecodeGraphConfig, DecodeGraphs
from engine.model.llama import KVCache, LlamaModel
from engine.model.lora.slots import LoraSlots
from engine.outputs import TokenLogprob
from engine.progress import timed_stage
from engine.sampling.sampler import Sampler, SamplingRow
from engine.structured.matchers import StepGrammars

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: TokenLogprob | None


@dataclass(frozen=True)
class StepResult:
    # One entry per SchedulerOutput.scheduled, in order: the new token, or None for a
    # prefill chunk that did not reach the end of the sequence.
    sampled: tuple[SampledToken | None, ...]
    # seq_id -> logprobs of the prompt tokens predicted in this step's chunk, in order
    # (entry k is for prompt token start + k + 1).
    prompt_logprobs: dict[int, list[TokenLogprob]]


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
        # The model's adapter slots and the host copies of every loaded adapter (LoRA on).
        self.lora_slots: LoraSlots | None = None
        if model.lora is not None:
            self.lora_slots = LoraSlots(model.lora_sites, model.lora.max_loras, model.dtype,
                                        model.device)
        self.sampler = Sampler(vocab_size, seed=seed)
        self.vocab_size = vocab_size
        # Per-request generators for seeded sampling, keyed by seq_id; released on finish.
        self._generators: dict[int, torch.Generator] = {}

    def add_lora(self, adapter_id: int, adapter: LoraAdapter) -> None:
        assert self.lora_slots is not None, "LoRA is off"
        self.lora_slots.add(adapter_id, adapter)

    def drop_lora(self, adapter_id: int) -> None:
        if self.lora_slots is not None:
            self.lora_slots.remove(adapter_id)

    def step_inputs(self, out: SchedulerOutput) -> StepInputs:
        """The step's tensors, its adapters made resident first (each row's slot)."""
        lora = self.model.lora
        if self.lora_slots is None or lora is None:
            return build_step_inputs(out, self.block_size, self.model.device)
        placed = self.lora_slots.prepare(s.seq.lora.id for s in out.scheduled
                                   if s.seq.lora is not None)
        slots = [-1 if s.seq.lora is None else placed[s.seq.lora.id] for s in out.scheduled]
        return build_step_inputs(out, self.block_size, self.model.device, slots,
                                 lora.max_loras, lora.kernels.reads_groups)

    def run(self, out: SchedulerOutput, grammars: StepGrammars | None = None) -> StepResult:
        """``grammars``: the constrained sequences' matchers (a per-row side input of the step,
        None when no sampling sequence has one). Their masks are computed on the host after
        the forward pass is queued, so on a GPU they overlap it."""
        inputs = self.step_inputs(out)
        if self._use_graph(out, inputs):
            assert self.graphs is not None
            # One row per sequence: the graph's logits are already per sequence.
            step_logits = self.graphs.run(inputs.input_ids, inputs.positions, inputs.meta,
                                          inputs.lora)
            prompt_logprobs: dict[int, list[TokenLogprob]] = {}
        else:
            hidden = self.model.forward(inputs.input_ids, inputs.positions, self.kv_caches,
                                        inputs.meta, inputs.lora)  # [T, hidden]
            prompt_logprobs = self._prompt_logprobs(out, inputs, hidden)
            step_logits = None
        sampled: list[SampledToken | None] = [None] * len(out.scheduled)
        if inputs.sampling_seq_indices:
            if step_logits is not None:
                logits = step_logits[inputs.logits_indices]  # [S, V]
            else:
                logits = self.model.compute_logits(hidden[inputs.logits_indices])  # [S, V]
            rows = [self._sampling_row(out.scheduled[i]) for i in inputs.sampling_seq_indices]
            masks = (None if grammars is None
                     else grammars.masks_for(inputs.sampling_seq_indices))
            result = self.sampler(logits, rows, masks)
            for i, token_id, logprob in zip(inputs.sampling_seq_indices, result.token_ids,
                                            result.logprobs, strict=True):
                sampled[i] = SampledToken(token_id, logprob)
        return StepResult(tuple(sampled), prompt_logprobs)

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
                       and s.seq.num_computed_tokens < s.seq.num_prompt_tokens - 1
                       for s in out.scheduled)

    def release(self, seq_id: int) -> None:
        self._generators.pop(seq_id, None)

    def _sampling_row(self, s: ScheduledSeq) -> SamplingRow:
        seq = s.seq
        params = seq.params
        generator = None
        if params.seed is not None:
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
                           suppress_token_ids=suppress)

    def _prompt_logprobs(self, out: SchedulerOutput, inputs: StepInputs,
                         hidden: torch.Tensor) -> dict[int, list[TokenLogprob]]:
        """Logprobs of prompt tokens for sequences that asked (echo with logprobs)."""
        result: dict[int, list[TokenLogprob]] = {}
        for i, s in enumerate(out.scheduled):
            seq = s.seq
            k = seq.params.prompt_logprobs
            start = seq.num_computed_tokens
            # Row p predicts token p + 1; only prompt tokens are of interest.
            end = min(start + s.num_new_tokens, seq.num_prompt_tokens - 1)
            if k is None or start >= end:
                continue
            row0 = inputs.meta.query_start_loc_cpu[i]
            logits = self.model.compute_logits(hidden[row0:row0 + end - start])
            logprobs = torch.log_softmax(logits[:, :self.vocab_size], dim=-1)  # [n, V]
            targets = torch.tensor(seq.prompt_token_ids[start + 1:end + 1],
                                   device=logprobs.device)
            chosen = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
            top_vals, top_ids = (logprobs.topk(k, dim=-1) if k > 0
                                 else (logprobs[:, :0], logprobs[:, :0].long()))
            top_vals_l, top_ids_l = top_vals.tolist(), top_ids.tolist()
            result[seq.seq_id] = [
                TokenLogprob(int(t), float(c), tuple(zip(ids, vals, strict=True)))
                for t, c, ids, vals in zip(targets.tolist(), chosen, top_ids_l, top_vals_l,
                                           strict=True)]
        return result
