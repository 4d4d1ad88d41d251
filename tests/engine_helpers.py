"""Helpers for engine tests: run requests to completion and read logits through the paged path."""

from __future__ import annotations

import itertools

import torch

from engine.core.batch import build_step_inputs
from engine.core.llm_engine import LLMEngine
from engine.core.scheduler import ScheduledSeq, SchedulerOutput
from engine.core.sequence import Sequence
from engine.outputs import GenerationDelta
from engine.params import SamplingParams

_ids = itertools.count(10_000_000)


def run_to_completion(engine: LLMEngine,
                      requests: dict[str, tuple[list[int], SamplingParams]],
                      max_steps: int = 100_000) -> dict[str, list[GenerationDelta]]:
    """Add every request, step until all finish, return each request's deltas in order."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    deltas: dict[str, list[GenerationDelta]] = {rid: [] for rid in requests}
    for _ in range(max_steps):
        if not engine.has_work:
            break
        for delta in engine.step():
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
    ``steps`` tokens through the engine's block tables and KV cache. Frees its blocks."""
    assert sum(steps) == len(prompt)
    seq = Sequence(next(_ids), "logits-probe", list(prompt), SamplingParams(max_tokens=1))
    blocks, runner = engine.scheduler.block_manager, engine.runner
    logits = None
    try:
        for n in steps:
            blocks.allocate(seq, seq.num_computed_tokens + n)
            out = SchedulerOutput((ScheduledSeq(seq, n),), ())
            inputs = build_step_inputs(out, blocks.block_size, runner.model.device)
            hidden = runner.model.forward(inputs.input_ids, inputs.positions, runner.kv_caches,
                                          inputs.meta)
            logits = runner.model.compute_logits(hidden[-1:])[0]
            seq.num_computed_tokens += n
    finally:
        blocks.free(seq)
    assert logits is not None
    return logits[:engine.tokenizer.vocab_size].float().cpu()
