"""Warm-up: every shape the engine will meet runs once before the server reports ready, so the
first real request is as fast as the hundredth.

What is cold on a GPU: Triton compiles a kernel for each specialisation it meets (an integer
argument equal to 1, divisible by 16, or neither), the linear backend's plan picks other
kernels at other step sizes, CUDA loads each kernel module on its first launch, and cuBLAS and
the sort and scatter kernels of the sampler set up on first use. So the warm-up runs:

- prefill: one step of each power-of-two size (the linear plan's ladder, which also covers
  each Triton specialisation) up to the step budget, and one of the budget itself;
- decode: a batch of each decode size (every CUDA-graph bucket; on the CPU, one row and
  ``max_num_seqs`` rows), two decode steps each, its rows cycling through every sampler path:
  greedy, temperature with top-p, top-k and min-p, the penalties, logit bias, logprobs (the
  most alternatives allowed), seeded rows and min_tokens suppression;
- prompt logprobs: one request that asks for them (its own logits path);
- the paged prefill kernel's variants that single-prompt steps never launch (a fresh prompt
  beside decodes or later chunks; block tables of 1, 16 or other numbers of blocks), launched
  directly by the attention backend;
- with LoRA adapters loaded, every prefill size once more with one of them, and half the rows
  of each decode batch with it (the LoRA kernels, the decode graphs that read adapters).

On the CPU nothing is compiled or loaded lazily, so the sizes are not repeated there: one short
prefill and one decode batch that has a row of every sampler path run the same code paths in
a fraction of a second (tests start many servers).

Prompts are distinct random token ids and the prefix cache is off meanwhile, so each prefill
computes the size it is meant to. Afterwards the cache is empty and every counter is zero.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from dataclasses import dataclass

from engine.core.llm_engine import LLMEngine
from engine.params import MAX_TOP_LOGPROBS, SamplingParams

log = logging.getLogger(__name__)

# Each decode row's sampler path, cycled over the rows of a batch.
SAMPLER_PATHS: tuple[SamplingParams, ...] = (
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.8, top_p=0.9),
    SamplingParams(temperature=1.0, top_k=20),
    SamplingParams(temperature=0.7, min_p=0.05),
    SamplingParams(temperature=0.9, repetition_penalty=1.2, frequency_penalty=0.5,
                   presence_penalty=0.5),
    SamplingParams(temperature=0.0, logit_bias={3: 2.0, 4: -100.0}),
    SamplingParams(temperature=0.8, logprobs=MAX_TOP_LOGPROBS),
    SamplingParams(temperature=0.8, top_p=0.95, seed=1234),
    SamplingParams(temperature=0.8, min_tokens=3, stop_token_ids=(5,)),
)
_DECODE_STEPS = 2


@dataclass(frozen=True)
class WarmupReport:
    prefill_sizes: tuple[int, ...]
    decode_sizes: tuple[int, ...]
    seconds: float


def prefill_sizes(max_num_batched_tokens: int, max_model_len: int) -> list[int]:
    """1, 2, 4, ... below the largest prefill a step can take, and that largest one."""
    limit = min(max_num_batched_tokens, max_model_len - 1)
    sizes = []
    size = 1
    while size < limit:
        sizes.append(size)
        size *= 2
    return [*sizes, limit]


def warmup_sizes(engine: LLMEngine) -> tuple[list[int], list[int]]:
    """(prefill step sizes, decode batch sizes) to run."""
    config = engine.scheduler.config
    prefills = prefill_sizes(config.max_num_batched_tokens, config.max_model_len)
    graphs = engine.runner.graphs
    if engine.runner.model.device.type == "cpu":
        return prefills[-1:] if prefills[-1] < 16 else [16], [
            min(config.max_num_seqs, len(SAMPLER_PATHS))]
    if graphs is not None:
        return prefills, list(graphs.buckets)
    return prefills, sorted({1, config.max_num_seqs})


def warm_up(engine: LLMEngine) -> WarmupReport:
    """Run the warm-up on an idle engine; leaves it idle, its cache empty, its counters 0."""
    if engine.has_work:
        raise RuntimeError("warm-up needs an idle engine")
    t0 = time.monotonic()
    caching = engine.scheduler.block_manager.enable_caching
    engine.reset_prefix_cache(enable=False)
    rng = random.Random(0)
    vocab = engine.tokenizer.vocab_size
    config = engine.scheduler.config

    def prompt(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    adapters = engine.lora_adapters()
    lora = adapters[0].name if adapters else None
    prefills, decodes = warmup_sizes(engine)
    engine.runner.warm_up_attention()
    for size in prefills:
        for with_lora in ((False, True) if lora else (False,)):
            _run(engine, {f"warmup-prefill-{size}": (prompt(size), SamplingParams(
                temperature=0.0, max_tokens=1, ignore_eos=True), lora if with_lora else None)})
    for size in decodes:
        rows = {}
        for i in range(size):
            path = SAMPLER_PATHS[i % len(SAMPLER_PATHS)]
            rows[f"warmup-decode-{size}-{i}"] = (prompt(2), dataclasses.replace(
                path, max_tokens=1 + _DECODE_STEPS, ignore_eos=True), lora if i % 2 else None)
        _run(engine, rows)
    _run(engine, {"warmup-prompt-logprobs": (prompt(min(16, config.max_model_len - 2)),
                                             SamplingParams(temperature=0.0, max_tokens=1,
                                                            prompt_logprobs=MAX_TOP_LOGPROBS,
                                                            logprobs=1), None)})
    engine.reset_prefix_cache(enable=caching)
    engine.reset_counters()
    report = WarmupReport(tuple(prefills), tuple(decodes), time.monotonic() - t0)
    log.info("warm-up: prefill steps of %s tokens, decode batches of %s rows, in %.2f s",
             report.prefill_sizes, report.decode_sizes, report.seconds)
    return report


def _run(engine: LLMEngine,
         requests: dict[str, tuple[list[int], SamplingParams, str | None]]) -> None:
    for request_id, (prompt, params, lora) in requests.items():
        engine.add_request(request_id, prompt, params, lora=lora)
    while engine.has_work:
        for out in engine.step():
            if out.error is not None:
                raise RuntimeError(f"warm-up request {out.request_id} failed: {out.error}")
