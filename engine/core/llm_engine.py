"""The synchronous engine: requests in, one step at a time, deltas out. Single-threaded.

The step loop reads in three lines, as in nano-vllm:

    out = scheduler.schedule(); result = runner.run(out); deltas = self._postprocess(out, result)
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.checkpoint.loader import load_checkpoint
from engine.checkpoint.types import LlamaArchConfig
from engine.config import EngineConfig
from engine.core.block_manager import BlockManager
from engine.core.build import (
    make_attention_backend,
    make_linear_backend,
    make_lora_model_config,
    num_kv_blocks,
    resolve_device,
    resolve_dtype,
)
from engine.core.output_processor import OutputProcessor, RequestState
from engine.core.runner import ModelRunner, StepResult
from engine.core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from engine.core.sequence import Sequence
from engine.faults import FaultKind, FaultPlan, InjectedFault, InjectedLoopCrash
from engine.lora.peft import LoraAdapter, load_adapter
from engine.lora.registry import LoraAdapterInfo, LoraRegistry
from engine.lora.spec import LoraError, LoraSpec
from engine.model.cuda_graphs import DecodeGraphConfig
from engine.model.llama import LlamaModel
from engine.outputs import FinishReason, GenerationDelta, ModelInfo
from engine.params import SamplingParams
from engine.progress import timed_stage
from engine.structured.grammar import GrammarError, GrammarLimits
from engine.structured.manager import StructuredConfig, StructuredOutputs
from engine.tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# How long a step with nothing to run waits for a compiling grammar before it returns (the
# engine loop then looks at its inbox and calls step again).
_COMPILE_POLL_S = 0.005


class PromptError(ValueError):
    """A prompt the engine cannot take. ``param`` names the offending request field."""

    def __init__(self, message: str, param: str = "prompt",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass
class EngineCounters:
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_steps: int = 0
    # Prompt tokens run through the model, recomputation after preemption included (prompt
    # tokens taken from the prefix cache are not): the prefill work actually done.
    num_prompt_tokens_computed: int = 0
    # Steps whose model run raised, in a row (reset by a step that succeeds): a device that
    # keeps failing makes the async front stop the loop so the server reports itself unhealthy.
    num_consecutive_failed_steps: int = 0


LoraReader = Callable[[LoraSpec], LoraAdapter]


class LLMEngine:
    def __init__(self, model_info: ModelInfo, tokenizer: Tokenizer, scheduler: Scheduler,
                 runner: ModelRunner, model_memory_bytes: int | None = None,
                 structured: StructuredConfig | None = None,
                 faults: FaultPlan | None = None,
                 lora_reader: LoraReader | None = None) -> None:
        """``lora_reader`` reads and checks an adapter against this model (None: LoRA off)."""
        self.model_info = model_info
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.runner = runner
        self.max_model_len = model_info.max_model_len
        self.outputs = OutputProcessor(tokenizer, self.max_model_len)
        self.structured = StructuredOutputs(tokenizer, structured or StructuredConfig())
        self.counters = EngineCounters()
        # Device memory the weights (and the linear kernels' scratch) took, when on a GPU.
        self.model_memory_bytes = model_memory_bytes
        self._states: dict[str, RequestState] = {}
        # Requests whose grammar failed to compile, for the caller to fail (take_refused).
        self._refused: list[tuple[str, GrammarError]] = []
        self._seq_ids = itertools.count()
        self.faults = faults or FaultPlan.none()
        self._lora_reader = lora_reader
        self.loras = LoraRegistry()

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLMEngine:
        device = resolve_device(config)
        dtype = resolve_dtype(config, device)
        ckpt = load_checkpoint(config.model, config.revision,
                               download_dir=config.download_dir, offline=config.offline)
        arch = ckpt.arch
        max_model_len = config.max_model_len or arch.max_position_embeddings
        faults = FaultPlan.from_environment()
        start = time.monotonic()
        tokenizer = Tokenizer.from_pretrained(ckpt.path, faults)
        timed_stage(log, "tokenizer", start, f"vocabulary of {tokenizer.vocab_size} loaded")
        linear = make_linear_backend(config, ckpt.quant, device, dtype)
        attention = make_attention_backend(config, device)
        lora = make_lora_model_config(config, linear, device)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        start = time.monotonic()
        model = LlamaModel(arch, ckpt.weights, linear, attention, dtype, device,
                           max_position=max(max_model_len, arch.max_position_embeddings),
                           lora=lora)
        timed_stage(log, "model", start, f"{arch.num_layers} layers on {device} "
                    f"({str(dtype).removeprefix('torch.')}) built")
        start = time.monotonic()
        linear.post_init(config.max_num_batched_tokens)
        timed_stage(log, "kernels", start, f"linear {linear.name}, attention {attention.name} "
                    "set up")
        model_bytes = (torch.cuda.memory_allocated(device) - before
                       if device.type == "cuda" else None)
        if model_bytes is not None:
            log.info("model on the card: %.2f GiB (weights and linear-kernel buffers)",
                     model_bytes / 2**30)
        blocks = num_kv_blocks(config, arch, device, dtype, max_model_len)
        # Only the Triton attention backend reads every size from device tensors (capturable).
        graphs = (DecodeGraphConfig(config.max_num_seqs, max_model_len)
                  if config.cuda_graphs and attention.name == "triton" else None)
        runner = ModelRunner(model, blocks, config.block_size, tokenizer.eos_token_id,
                             tokenizer.vocab_size, config.seed, graphs)
        scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, max_model_len,
                            max_loras=None if lora is None else lora.max_loras),
            BlockManager(blocks, config.block_size, config.enable_prefix_caching))
        # A local folder has no revision; a hub repo's is the branch the user asked for.
        revision = None if Path(config.model).is_dir() else config.revision
        info = ModelInfo(model=config.model, revision=revision, bits=ckpt.quant.bits,
                         group_size=ckpt.quant.group_size, act_order=ckpt.quant.desc_act,
                         linear_backend=linear.name, attention_backend=attention.name,
                         max_model_len=max_model_len, vocab_size=tokenizer.vocab_size,
                         device=str(device), random_weights=ckpt.random_weights,
                         max_loras=0 if config.lora is None else config.lora.max_loras,
                         max_lora_rank=0 if config.lora is None else config.lora.max_lora_rank)
        structured = StructuredConfig(
            limits=GrammarLimits(), compile_timeout_s=config.grammar_compile_timeout,
            cache_size=config.grammar_cache_size)
        engine = cls(info, tokenizer, scheduler, runner, model_bytes, structured, faults,
                     _lora_reader(config, arch))
        if config.lora is not None:
            engine._load_start_adapters(config.lora.adapters)
        log.info("engine ready: %s", info)
        return engine

    @property
    def has_work(self) -> bool:
        """Requests to step, or grammars still compiling for some."""
        return self.scheduler.has_work or self.structured.has_compiling

    def validate_prompt(self, prompt_token_ids: Seq[int]) -> None:
        if not prompt_token_ids:
            raise PromptError("the prompt is empty")
        vocab = self.tokenizer.vocab_size
        for t in prompt_token_ids:
            if not isinstance(t, int) or not 0 <= t < vocab:
                raise PromptError(f"token id {t!r} is outside the vocabulary [0, {vocab})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise PromptError(
                f"the prompt has {len(prompt_token_ids)} tokens; this model's maximum context "
                f"length is {self.max_model_len}, which must leave room for at least one new "
                "token", code="context_length_exceeded")

    # ---- LoRA adapters ---------------------------------------------------------------------

    def read_adapter(self, spec: LoraSpec) -> LoraAdapter:
        """Read and check an adapter (any thread: touches no engine state)."""
        if self._lora_reader is None:
            raise LoraError("this server was started without LoRA support (give "
                            "--lora-modules or --allow-runtime-lora-updating)",
                            code="lora_disabled")
        return self._lora_reader(spec)

    def load_lora(self, adapter: LoraAdapter, replace: bool = False) -> LoraAdapterInfo:
        """Serve a read adapter under its name (``replace``: instead of the one loaded under
        it; requests already running keep the old weights to the end)."""
        spec = adapter.spec
        info = LoraAdapterInfo(name=spec.name, source=spec.source, revision=spec.revision,
                               rank=adapter.rank, target_modules=adapter.target_modules,
                               digest=adapter.digest)
        handle, dropped = self.loras.add(info, replace)
        self.runner.add_lora(handle.id, adapter)
        if dropped is not None:
            self.runner.drop_lora(dropped)
        log.info("LoRA adapter '%s' loaded from %s: rank %d on %s (%.1f MiB)", spec.name,
                 spec.describe(), adapter.rank, ", ".join(adapter.target_modules),
                 adapter.nbytes / 2**20)
        return info

    def unload_lora(self, name: str) -> None:
        dropped = self.loras.remove(name)
        if dropped is not None:
            self.runner.drop_lora(dropped)
        log.info("LoRA adapter '%s' unloaded", name)

    def lora_adapters(self) -> tuple[LoraAdapterInfo, ...]:
        return self.loras.infos()

    def _load_start_adapters(self, specs: tuple[LoraSpec, ...]) -> None:
        """The --lora-modules adapters; the first bad one raises LoraError (no server)."""
        start = time.monotonic()
        for spec in specs:
            self.load_lora(self.read_adapter(spec))
        slots = self.runner.lora_slots
        assert slots is not None
        timed_stage(log, "lora", start, f"{len(specs)} adapters loaded; {slots.max_loras} "
                    f"device slots of rank {self.model_info.max_lora_rank} "
                    f"({slots.device_bytes / 2**30:.2f} GiB)")

    # ---- requests ----------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: Seq[int],
                    params: SamplingParams, extra_hash_key: str | None = None,
                    lora: str | None = None) -> None:
        """Queue a request, with the base model or the adapter named ``lora``.
        ``extra_hash_key`` names whatever else besides the tokens changes its K/V; requests
        share cached KV blocks only when their keys (the adapter's included) match."""
        if request_id in self._states:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.validate_prompt(prompt_token_ids)
        handle = None if lora is None else self.loras.acquire(lora)
        if handle is not None:
            extra_hash_key = handle.hash_key if extra_hash_key is None \
                else f"{handle.hash_key}|{extra_hash_key}"
        seq = Sequence(next(self._seq_ids), request_id, list(prompt_token_ids), params,
                       extra_hash_key=extra_hash_key, lora=handle)
        state = self.outputs.new_state(seq)
        if self.faults.active:
            state.faults = self.faults.kinds_for(self.tokenizer.decode(prompt_token_ids))
        self._states[request_id] = state
        if params.constraint is None:
            self.scheduler.add(seq)
            return
        state.grammar = self.structured.add(seq)
        if state.grammar is not None:  # compiled before (cached)
            self.scheduler.add(seq)

    def take_refused(self) -> list[tuple[str, GrammarError]]:
        """Requests that ended because their grammar could not be compiled (a time or size
        limit), with the error to give their caller; each is reported once."""
        refused, self._refused = self._refused, []
        return refused

    def abort_request(self, request_id: str) -> GenerationDelta | None:
        """End a request now; returns its final ABORT delta, or None if it is not running."""
        state = self._states.get(request_id)
        if state is None:
            return None
        return self._finish(state, FinishReason.ABORT)

    def abort_all(self, reason: FinishReason, error: str | None = None) -> list[GenerationDelta]:
        return [self._finish(state, reason, error) for state in list(self._states.values())]

    def reset_prefix_cache(self, enable: bool | None = None) -> None:
        """Forget every cached block and, if ``enable`` is given, turn prefix caching on or
        off (as vLLM's reset_prefix_cache): lets a benchmark compare runs on one loaded model.
        Only while idle, when no sequence holds a block."""
        if self.has_work:
            raise RuntimeError("the prefix cache can only be reset while no request runs")
        old = self.scheduler.block_manager
        self.scheduler.block_manager = BlockManager(
            old.num_blocks, old.block_size, old.enable_caching if enable is None else enable)

    def step(self) -> list[GenerationDelta]:
        if self.structured.has_compiling:
            self._admit_compiled()
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        try:
            self._inject_step_faults(out)
            result = self.runner.run(out, self.structured.for_step(out))
        except Exception as exc:
            return self._fail_step(out, exc)
        self.counters.num_consecutive_failed_steps = 0
        self.counters.num_prompt_tokens_computed += sum(s.num_new_prompt_tokens
                                                        for s in out.scheduled)
        self.scheduler.on_step_done(out)
        return self._postprocess(out, result)

    def _admit_compiled(self) -> None:
        """Schedule the requests whose grammar is ready; refuse those whose compile failed.
        With nothing else to run, wait a moment for a compile rather than spin."""
        idle = not self.scheduler.has_work
        admitted = self.structured.poll(_COMPILE_POLL_S if idle else 0.0)
        for seq in admitted.ready:
            self._states[seq.request_id].grammar = self.structured.grammar(seq.seq_id)
            self.scheduler.add(seq)
        for seq, error in admitted.refused:
            self._refused.append((seq.request_id, error))
            self._release(self._states[seq.request_id])

    def _fail_step(self, out: SchedulerOutput, exc: Exception) -> list[GenerationDelta]:
        """A model run that raised ends the requests it was running, and only those: their KV
        may be half-written, while waiting requests and running ones left out of the step hold
        nothing it touched. The step is not counted as done, so their blocks are freed as they
        are."""
        self.counters.num_consecutive_failed_steps += 1
        ids = [s.seq.request_id for s in out.scheduled]
        log.error("engine step failed; ending its %d requests (%s): %r", len(ids),
                  ", ".join(ids), exc, exc_info=exc)
        return [self._finish(self._states[i], FinishReason.ERROR, f"engine step failed: {exc!r}")
                for i in ids if i in self._states]

    def _inject_step_faults(self, out: SchedulerOutput) -> None:
        if not self.faults.active:
            return
        for s in out.scheduled:
            kinds = self._states[s.seq.request_id].faults
            if FaultKind.LOOP_CRASH in kinds:
                raise InjectedLoopCrash("injected engine loop crash")
            if FaultKind.STEP_ERROR in kinds:
                raise InjectedFault("injected model step fault")

    def _postprocess(self, out: SchedulerOutput, result: StepResult) -> list[GenerationDelta]:
        self.counters.num_steps += 1
        deltas: list[GenerationDelta] = []
        accepted = self._advance_grammars(out, result)
        for s, sampled in zip(out.scheduled, result.sampled, strict=True):
            state = self._states[s.seq.request_id]
            if s.seq.seq_id in result.prompt_logprobs:
                self.outputs.add_prompt_logprobs(state, result.prompt_logprobs[s.seq.seq_id])
            if sampled is None:
                continue
            self.counters.num_generation_tokens += 1
            if s.seq.num_output_tokens == 0:
                # Counted once, when the prefill completes (not again after a preemption).
                self.counters.num_prompt_tokens += s.seq.num_prompt_tokens
            try:
                delta = self.outputs.on_token(state, sampled, accepted.get(s.seq.seq_id))
            except Exception as exc:
                # Detokenising or a stop rule failed for this request: it alone ends.
                log.error("output processing failed for request %s: %r", state.seq.request_id,
                          exc, exc_info=exc)
                deltas.append(self._finish(state, FinishReason.ERROR,
                                           f"output processing failed: {exc!r}"))
                continue
            if delta.finished:
                self._release(state)
            deltas.append(delta)
        return deltas

    def _advance_grammars(self, out: SchedulerOutput, result: StepResult) -> dict[int, bool]:
        """Advance every constrained sequence's matcher by its new token, all at once in the
        grammar engine's threads; seq_id -> whether the grammar took it."""
        if self.structured.grammar_count == 0:
            return {}
        pairs = [(s.seq.seq_id, sampled.token_id)
                 for s, sampled in zip(out.scheduled, result.sampled, strict=True)
                 if sampled is not None]
        return self.structured.advance(pairs)

    def _finish(self, state: RequestState, reason: FinishReason,
                error: str | None = None) -> GenerationDelta:
        delta = self.outputs.on_finish(state, reason, error)
        self._release(state)
        return delta

    def _release(self, state: RequestState) -> None:
        seq = state.seq
        self.scheduler.finish(seq)
        self.runner.release(seq.seq_id)
        self.structured.release(seq.seq_id)
        if seq.lora is not None and self.loras.release(seq.lora):
            self.runner.drop_lora(seq.lora.id)  # unloaded earlier; this was its last user
        del self._states[seq.request_id]


def _lora_reader(config: EngineConfig, arch: LlamaArchConfig) -> LoraReader | None:
    """Reads and checks an adapter against this model (None: LoRA off)."""
    lora = config.lora
    if lora is None:
        return None

    def read(spec: LoraSpec) -> LoraAdapter:
        return load_adapter(spec, arch, lora.max_lora_rank, download_dir=config.download_dir,
                            offline=config.offline)

    return read
