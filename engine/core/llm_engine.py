"""The engine core: requests in, one step at a time, each request's new tokens out.

The step reads as in nano-vllm, with the host work of step n + 1 overlapped with the device
running step n:

    out = scheduler.schedule(); handle = runner.launch(out)   # step n + 1, queued on the device
    outputs = accept(previous_handle.resolve())               # step n's tokens, on the host

While the device runs a step, the host resolves the one before (stop rules, outputs for the
front) and schedules and builds the next one; the sampled ids stay on the device, where the
next step reads them (engine/core/runner.py), and ``resolve`` is the step's one wait. On the CPU
``launch`` computes the step itself, so there is nothing to overlap, but the same code runs in
the same order (each step's tokens then come one step later than they could);
``overlap=False`` (``EngineConfig.overlap_steps``) resolves each step right after launching it.

The token-level rules (EOS, stop tokens, length, grammars) are engine/core/request.py's;
detokenising and stop strings are the front's (engine/frontend/output_processor.py), which
aborts a request whose stop string it finds. docs/architecture.md ("Overlapped steps") says
what overlapping changes and why every output stays what a one-step-at-a-time engine gives;
in short: a request that ends in step n may already be in step n + 1, whose token for it is
then dropped; ends by length are known ahead; penalties count a pending token on the device; a
preempted sequence is readmitted once its pending token is known; a constrained sequence whose
token is pending gets the step before delivered after its own forward pass is queued and
before it samples (``side_inputs``), so its mask comes from the advanced matcher.
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

from engine.checkpoint.hub import resolve_checkpoint
from engine.checkpoint.loader import load_folder
from engine.checkpoint.types import LlamaArchConfig
from engine.config import EngineConfig
from engine.core.adapters import EngineAdapters, LoraReader
from engine.core.block_manager import BlockManager
from engine.core.build import (
    make_attention_backend,
    make_linear_backend,
    make_lora_model_config,
    num_kv_blocks,
    resolve_device,
    resolve_dtype,
)
from engine.core.prefix_cache import PrefixCacheStats
from engine.core.request import CoreRequest
from engine.core.runner import ModelRunner, SampledTokens, StepHandle
from engine.core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from engine.core.sequence import Sequence
from engine.faults import FaultKind, FaultPlan, InjectedFault, InjectedLoopCrash
from engine.ipc.messages import CoreFinish, RequestOutput
from engine.lora.peft import LoraAdapter, load_adapter
from engine.lora.registry import LoraAdapterInfo
from engine.lora.spec import LoraSpec
from engine.model.cuda_graphs import DecodeGraphConfig
from engine.model.llama import LlamaModel
from engine.outputs import EngineStats, ModelInfo
from engine.params import SamplingParams
from engine.progress import timed_stage
from engine.prompt import validate_prompt
from engine.structured.grammar import GrammarError, GrammarLimits
from engine.structured.manager import StructuredConfig, StructuredOutputs
from engine.structured.matchers import StepGrammars
from engine.tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# How long a step with nothing to run waits for a compiling grammar before it returns (the
# engine loop then looks at its inbox and calls step again).
_COMPILE_POLL_S = 0.005


@dataclass
class EngineCounters:
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_steps: int = 0
    # Prompt tokens run through the model, recomputation after preemption included (prompt
    # tokens taken from the prefix cache are not): the prefill work actually done.
    num_prompt_tokens_computed: int = 0
    # Steps whose model run raised, in a row (reset by a step that succeeds): a device that
    # keeps failing makes the core loop stop, so the server reports itself unhealthy.
    num_consecutive_failed_steps: int = 0



class LLMEngine:
    def __init__(self, model_info: ModelInfo, tokenizer: Tokenizer, scheduler: Scheduler,
                 runner: ModelRunner, model_memory_bytes: int | None = None,
                 overlap: bool = True, structured: StructuredConfig | None = None,
                 faults: FaultPlan | None = None,
                 lora_reader: LoraReader | None = None) -> None:
        """``lora_reader`` reads and checks an adapter against this model (None: LoRA off);
        ``faults``: the test-only fault hooks (engine/faults.py), off by default."""
        self.model_info = model_info
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.scheduler = scheduler
        self.runner = runner
        self.max_model_len = model_info.max_model_len
        self.structured = StructuredOutputs(tokenizer, structured or StructuredConfig())
        self.counters = EngineCounters()
        # Device memory the weights (and the linear kernels' scratch) took, when on a GPU.
        self.model_memory_bytes = model_memory_bytes
        # Resolve each step after launching the next (True) or right after its own launch.
        self.overlap = overlap
        self._states: dict[str, CoreRequest] = {}
        # Requests whose grammar failed to compile, for the caller to fail (take_refused).
        self._refused: list[tuple[str, GrammarError]] = []
        self._seq_ids = itertools.count()
        self.faults = faults or FaultPlan.none()
        self.adapters = EngineAdapters(runner, lora_reader, model_info.max_lora_rank)
        self.loras = self.adapters.registry
        # The launched step whose results are not yet on the host.
        self._inflight: StepHandle | None = None

    @classmethod
    def from_config(cls, config: EngineConfig,
                    on_checkpoint: Callable[[Path], None] | None = None) -> LLMEngine:
        """Load the model ``config`` names. ``on_checkpoint`` hears the checkpoint's folder
        once it is on disk (downloaded if need be), before the weights are read."""
        device = resolve_device(config)
        dtype = resolve_dtype(config, device)
        folder = resolve_checkpoint(config.model, config.revision,
                                    download_dir=config.download_dir, offline=config.offline)
        if on_checkpoint is not None:
            on_checkpoint(folder)
        ckpt = load_folder(folder)
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
        graphs = (DecodeGraphConfig(config.max_num_seqs, max_model_len,
                                    min(config.cuda_graph_max_tokens,
                                        config.max_num_batched_tokens))
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
        engine = cls(info, tokenizer, scheduler, runner, model_bytes, config.overlap_steps,
                     structured, faults, _lora_reader(config, arch))
        if config.lora is not None:
            engine.adapters.load_at_start(config.lora.adapters)
        log.info("engine ready: %s", info)
        return engine

    @property
    def has_work(self) -> bool:
        """Requests to schedule, a launched step whose tokens are not yet delivered, or
        grammars still compiling for some."""
        return (self.scheduler.has_work or self._inflight is not None
                or self.structured.has_compiling)

    def validate_prompt(self, prompt_token_ids: Seq[int]) -> None:
        validate_prompt(prompt_token_ids, self.tokenizer.vocab_size, self.max_model_len)

    # ---- LoRA adapters (engine/core/adapters.py) -------------------------------------------

    def read_adapter(self, spec: LoraSpec) -> LoraAdapter:
        """Read and check an adapter (any thread: touches no engine state)."""
        return self.adapters.read(spec)

    def load_lora(self, adapter: LoraAdapter, replace: bool = False) -> LoraAdapterInfo:
        return self.adapters.load(adapter, replace)

    def unload_lora(self, name: str) -> None:
        self.adapters.unload(name)

    def lora_adapters(self) -> tuple[LoraAdapterInfo, ...]:
        return self.adapters.infos()

    # ---- requests ----------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: Seq[int],
                    params: SamplingParams, extra_hash_key: str | None = None,
                    arrival_time: float | None = None, lora: str | None = None) -> None:
        """Queue a request, with the base model or the adapter named ``lora``.
        ``extra_hash_key`` names whatever else besides the tokens changes its K/V; requests
        share cached KV blocks only when their keys (the adapter's included) match."""
        if request_id in self._states:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.validate_prompt(prompt_token_ids)
        handle = None if lora is None else self.adapters.acquire(lora)
        if handle is not None:
            extra_hash_key = handle.hash_key if extra_hash_key is None \
                else f"{handle.hash_key}|{extra_hash_key}"
        seq = Sequence(next(self._seq_ids), request_id, list(prompt_token_ids), params,
                       extra_hash_key=extra_hash_key, lora=handle)
        if arrival_time is not None:
            seq.arrival_time = arrival_time
        self._states[request_id] = CoreRequest(
            seq, [None] if params.prompt_logprobs is not None else None)
        if self.faults.active:
            self._states[request_id].faults = self.faults.kinds_for(
                self.tokenizer.decode(prompt_token_ids))
        # A constrained request waits outside the scheduler until its grammar is compiled.
        if params.constraint is None or self.structured.add(seq) is not None:
            self.scheduler.add(seq)

    def take_refused(self) -> list[tuple[str, GrammarError]]:
        """Requests that ended because their grammar could not be compiled (a time or size
        limit), with the error to give their caller; each is reported once."""
        refused, self._refused = self._refused, []
        return refused

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """End a request now; returns its final ABORT output, or None if it is not running."""
        request = self._states.get(request_id)
        if request is None:
            return None
        return self._end(request, CoreFinish.ABORT)

    def abort_all(self, finish: CoreFinish, error: str | None = None) -> list[RequestOutput]:
        return [self._end(r, finish, error) for r in list(self._states.values())]

    def reset_prefix_cache(self, enable: bool | None = None) -> None:
        """Forget every cached block and, if ``enable`` is given, turn prefix caching on or
        off (as vLLM's reset_prefix_cache): lets a benchmark compare runs on one loaded model.
        Only while idle, when no sequence holds a block."""
        if self.has_work:
            raise RuntimeError("the prefix cache can only be reset while no request runs")
        old = self.scheduler.block_manager
        self.scheduler.block_manager = BlockManager(
            old.num_blocks, old.block_size, old.enable_caching if enable is None else enable)

    def reset_counters(self) -> None:
        """Zero every counter (after the warm-up, so metrics count real traffic only)."""
        self.counters = EngineCounters()
        self.scheduler.num_preemptions_total = 0
        self.scheduler.prefix_cache_stats = PrefixCacheStats()

    def stats(self, loop_alive: bool = True, num_queued: int = 0) -> EngineStats:
        """``num_queued``: requests on their way in, counted as waiting."""
        sched, blocks = self.scheduler, self.scheduler.block_manager
        return EngineStats(
            num_running=len(sched.running), num_waiting=(len(sched.waiting) + self.structured.num_compiling
                                                     + num_queued),
            num_kv_blocks_total=blocks.num_blocks, num_kv_blocks_free=blocks.num_free_blocks,
            num_kv_blocks_cached=blocks.num_cached_blocks,
            num_preemptions_total=sched.num_preemptions_total,
            num_prompt_tokens_total=self.counters.num_prompt_tokens,
            num_generation_tokens_total=self.counters.num_generation_tokens,
            num_steps_total=self.counters.num_steps,
            num_prefix_cache_queries_total=sched.prefix_cache_stats.queries,
            num_prefix_cache_hits_total=sched.prefix_cache_stats.hits,
            loop_alive=loop_alive,
            running_lora_adapters=tuple(sorted({s.lora.name for s in sched.running
                                                if s.lora is not None})),
            waiting_lora_adapters=tuple(sorted({s.lora.name for s in sched.waiting
                                                if s.lora is not None})))

    # ---- the step ------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule and launch a step, and deliver the tokens of the step before it (of this
        one, without overlap). Returns one output per request that got tokens or ended."""
        if self.structured.has_compiling:
            self._admit_compiled()
        outputs: list[RequestOutput] = []
        out = self.scheduler.schedule()
        previous, self._inflight = self._inflight, None

        def side_inputs() -> StepGrammars | None:
            # Called once the step's forward pass is queued, before it samples. A grammar's
            # mask needs its sequence's previous token: when one is still pending, the step
            # before is delivered first (its tokens advance the matchers), while the device
            # runs this step's forward pass.
            nonlocal previous
            if previous is not None and self._grammar_waits(out):
                outputs.extend(self._deliver(previous))
                previous = None
            return self.structured.for_step(out)

        launched: StepHandle | None = None
        failure: Exception | None = None
        if not out.is_empty:
            try:
                self._inject_step_faults(out)
                launched = self.runner.launch(out, side_inputs)
            except Exception as exc:  # noqa: BLE001 - the step's requests end with an error
                failure = exc
            else:
                self.counters.num_consecutive_failed_steps = 0
                self._on_launched(out)
        self._inflight = launched
        if previous is not None:
            outputs += self._deliver(previous)
        if failure is not None:
            outputs += self._fail(out, failure)
        if self._inflight is not None and not self.overlap:
            handle, self._inflight = self._inflight, None
            outputs += self._deliver(handle)
        return outputs

    def shutdown(self) -> None:
        """Stop the grammar compiler's workers (after the last request ended)."""
        self.structured.shutdown()

    def _grammar_waits(self, out: SchedulerOutput) -> bool:
        """Whether a constrained sequence sampling in ``out`` has its last token pending."""
        return any(s.samples and s.seq.num_pending_tokens
                   and self.structured.grammar(s.seq.seq_id) is not None
                   for s in out.scheduled)

    def _on_launched(self, out: SchedulerOutput) -> None:
        self.counters.num_prompt_tokens_computed += sum(s.num_new_prompt_tokens
                                                        for s in out.scheduled)
        live = SchedulerOutput(tuple(s for s in out.scheduled if not s.seq.is_finished),
                               out.preempted)
        self.scheduler.on_step_launched(live)
        for s in live.scheduled:
            if s.samples:
                s.seq.num_pending_tokens += 1

    def _deliver(self, handle: StepHandle) -> list[RequestOutput]:
        """Wait for a launched step's results and turn them into outputs."""
        try:
            result = handle.resolve()
        except Exception as exc:  # noqa: BLE001 - a fault surfacing at the wait
            return self._fail(handle.out, exc)
        self.counters.num_steps += 1
        live = [(s.seq, sampled) for s, sampled in zip(handle.out.scheduled, result.sampled,
                                                       strict=True)
                if not s.seq.is_finished]  # one that ended while this step ran: tokens void
        grammar_ok = self._advance_grammars(live)
        outputs: list[RequestOutput] = []
        for seq, sampled in live:
            request = self._states[seq.request_id]
            if request.prompt_logprobs is not None and seq.seq_id in result.prompt_logprobs:
                request.add_prompt_logprobs(result.prompt_logprobs[seq.seq_id])
            if sampled is not None:
                outputs.append(self._accept(request, sampled, grammar_ok.get(seq.seq_id)))
        return outputs

    def _advance_grammars(self, live: list[tuple[Sequence, SampledTokens | None]]
                          ) -> dict[int, bool]:
        """Advance every constrained sequence's matcher by its new token, all at once in the
        grammar engine's threads; seq_id -> whether the grammar took it."""
        if self.structured.grammar_count == 0:
            return {}
        return self.structured.advance([(seq.seq_id, sampled.token_ids[0])
                                        for seq, sampled in live if sampled is not None])

    def _accept(self, request: CoreRequest, sampled: SampledTokens,
                grammar_ok: bool | None = None) -> RequestOutput:
        """A step's tokens for one request, through the stop rules, as its output."""
        seq = request.seq
        if not seq.output_token_ids:
            # Counted once, when the prefill completes (not again after a preemption).
            self.counters.num_prompt_tokens += seq.num_prompt_tokens
        accepted = request.accept(sampled.token_ids, self.eos_token_id, self.max_model_len,
                                  self.structured.grammar(seq.seq_id), grammar_ok)
        self.counters.num_generation_tokens += len(accepted.token_ids)
        self.scheduler.block_manager.cache_full_blocks(seq)
        logprobs = (None if sampled.logprobs is None
                    else list(sampled.logprobs[:len(accepted.token_ids)]))
        output = request.output(accepted.token_ids, logprobs, accepted.finish, accepted.error)
        if accepted.finish is not None:
            self._release(request)
        return output

    def _admit_compiled(self) -> None:
        """Schedule the requests whose grammar is ready; refuse those whose compile failed.
        With nothing else to run, wait a moment for a compile rather than spin."""
        idle = not self.scheduler.has_work and self._inflight is None
        admitted = self.structured.poll(_COMPILE_POLL_S if idle else 0.0)
        for seq in admitted.ready:
            self.scheduler.add(seq)
        for seq, error in admitted.refused:
            self._refused.append((seq.request_id, error))
            self._release(self._states[seq.request_id])

    def _fail(self, out: SchedulerOutput, exc: Exception) -> list[RequestOutput]:
        """A step that raised ends the requests it ran, and only those: their KV may be
        half-written, while the others hold nothing it touched."""
        self.counters.num_consecutive_failed_steps += 1
        ids = [s.seq.request_id for s in out.scheduled if not s.seq.is_finished]
        log.error("engine step failed; ending its %d requests (%s): %r", len(ids),
                  ", ".join(ids), exc, exc_info=exc)
        return [self._end(self._states[i], CoreFinish.ERROR, f"engine step failed: {exc!r}")
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

    def _end(self, request: CoreRequest, finish: CoreFinish,
             error: str | None = None) -> RequestOutput:
        """End a request from outside its tokens (abort, shutdown, fault)."""
        output = request.output([], [] if request.seq.params.logprobs is not None else None,
                                finish, error)
        self._release(request)
        return output

    def _release(self, request: CoreRequest) -> None:
        seq = request.seq
        self.scheduler.finish(seq)
        self.runner.release(seq.seq_id)
        self.structured.release(seq.seq_id)
        if seq.lora is not None:
            self.adapters.release(seq.lora)
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
