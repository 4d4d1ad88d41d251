"""Helpers for engine tests: the core driven in-process with the front's output processing, and
logits read through the paged path."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.core.batch import build_step_inputs
from engine.core.llm_engine import LLMEngine
from engine.core.scheduler import ScheduledSeq, SchedulerOutput
from engine.core.sequence import Sequence
from engine.frontend.output_processor import OutputProcessor, RequestState
from engine.outputs import FinishReason, GenerationDelta
from engine.params import SamplingParams

_ids = itertools.count(10_000_000)


class InProcessFront:
    """What the process client does with each step's outputs (engine/frontend/client.py),
    without the process: every core output becomes a GenerationDelta; a request the front
    ends (a stop string) is aborted in the core."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.outputs = OutputProcessor(engine.tokenizer)
        self.states: dict[str, RequestState] = {}

    def add(self, request_id: str, prompt: list[int], params: SamplingParams,
            extra_hash_key: str | None = None, lora: str | None = None) -> None:
        self.engine.add_request(request_id, prompt, params, extra_hash_key=extra_hash_key,
                                lora=lora)
        self.states[request_id] = self.outputs.new_state(request_id, prompt, params, 0.0)

    def step(self) -> list[GenerationDelta]:
        deltas = []
        for out in self.engine.step():
            state = self.states.get(out.request_id)
            if state is None:
                continue  # the front ended it already
            delta = self.outputs.process(state, out)
            deltas.append(delta)
            if delta.finished:
                del self.states[out.request_id]
                if out.finish is None:  # ended here (a stop string): the core must stop too
                    self.engine.abort_request(out.request_id)
        return deltas

    def abort(self, request_id: str) -> GenerationDelta | None:
        state = self.states.pop(request_id, None)
        if state is None:
            return None
        self.engine.abort_request(request_id)
        return self.outputs.end(state, FinishReason.ABORT)


def run_to_completion(engine: LLMEngine,
                      requests: dict[str, tuple[list[int], SamplingParams]],
                      max_steps: int = 100_000) -> dict[str, list[GenerationDelta]]:
    """Add every request, step until all finish, return each request's deltas in order."""
    front = InProcessFront(engine)
    for request_id, (prompt, params) in requests.items():
        front.add(request_id, prompt, params)
    deltas: dict[str, list[GenerationDelta]] = {rid: [] for rid in requests}
    for _ in range(max_steps):
        if not engine.has_work:
            break
        for delta in front.step():
            deltas[delta.request_id].append(delta)
    assert not engine.has_work, "the engine did not finish its work"
    return deltas


def output_tokens(deltas: list[GenerationDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def paged_logits(engine: LLMEngine, prompt: list[int], chunk: int | None = None) -> torch.Tensor:
    """Last-position logits [V] for ``prompt``, computed through the engine's model, block
    tables and KV cache, optionally in prefill chunks of ``chunk`` tokens. Frees its blocks."""
    step = chunk or len(prompt)
    return logits_after(engine, prompt, [min(step, len(prompt) - i)
                                         for i in range(0, len(prompt), step)])


def logits_after(engine: LLMEngine, prompt: list[int], steps: list[int]) -> torch.Tensor:
    """Last-position logits [V] float32 (on the CPU) after feeding ``prompt`` in chunks of
    ``steps`` tokens through the engine's block tables and KV cache, each chunk a step the way
    the runner computes one (the step graphs where they take its size). Frees its blocks."""
    assert sum(steps) == len(prompt)
    seq = Sequence(next(_ids), "logits-probe", list(prompt), SamplingParams(max_tokens=1))
    blocks, runner = engine.scheduler.block_manager, engine.runner
    logits = None
    try:
        for n in steps:
            blocks.allocate(seq, seq.num_computed_tokens + n)
            out = SchedulerOutput((ScheduledSeq(seq, n),), ())
            inputs = build_step_inputs(out, blocks.block_size, runner.model.device)
            logits = runner.model.compute_logits(runner.forward(inputs)[-1:])[0]
            seq.num_computed_tokens += n
    finally:
        blocks.free(seq)
    assert logits is not None
    return logits[:engine.tokenizer.vocab_size].float().cpu()


def synth_tiny_checkpoint(folder: Path, layout: tuple[int, int, bool], seed: int,
                          device: str = "cuda") -> Path:
    """A tiny synthetic checkpoint of ``layout`` (bits, group size, act-order) in ``folder``."""
    from engine.checkpoint.synth import SynthSpec, synthesize

    bits, group, act_order = layout
    synthesize(SynthSpec("tiny", bits, group, act_order, seed=seed, device=device), folder)
    return folder


def small_cuda_engine(path: Path, **overrides: object) -> LLMEngine:
    """An engine on the GPU over a tiny checkpoint, sized for tests (128 KV blocks of 16,
    8 sequences, 256-token steps, 512-token contexts); ``overrides`` are EngineConfig fields."""
    values: dict[str, object] = dict(model=str(path), revision=None, offline=True, device="cuda",
                                     num_kv_blocks=128, block_size=16, max_num_seqs=8,
                                     max_num_batched_tokens=256, max_model_len=512)
    values.update(overrides)
    return LLMEngine.from_config(EngineConfig(**values))  # type: ignore[arg-type]
