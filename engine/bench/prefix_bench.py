"""``gptq-serve bench prefix``: automatic prefix caching on and off, in one process, on one
loaded model.

Two workloads of ``--streams`` requests submitted at once, every request greedy, ignoring EOS
and generating exactly ``--output-len`` tokens:

- shared: one ``--system-len``-token system prompt followed by a distinct
  ``--question-len``-token question per request (a chat service's common case);
- unique: prompts of the same length that share nothing (0% hits: what the cache's
  bookkeeping costs when it cannot help).

Each runs ``--repeats`` times with caching on and off, alternating, after a short warm-up of
each on other tokens; the prefix cache is emptied before every run. Per run: time to first
token (submission to first token) median and p99, prompt tokens the model computed, the share
of looked-up prompt tokens found cached, and output throughput (all generated tokens over the
wall time from submission to the last token). Each figure printed is its median over the
repeats (a shared machine's noise moves single runs by several per cent).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from engine.bench.engine_bench import greedy
from engine.bench.server_bench import percentile
from engine.bench.table import Row
from engine.config import EngineConfig
from engine.core.llm_engine import LLMEngine


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="prefix, lora and server modes: where the model runs (engine and "
                        "kernels modes: cuda)")
    p.add_argument("--streams", type=int, default=32,
                   help="prefix and lora modes: requests at once; transport mode: requests "
                        "in each step message")
    p.add_argument("--system-len", type=int, default=1024,
                   help="prefix mode: tokens of the shared system prompt")
    p.add_argument("--question-len", type=int, default=16,
                   help="prefix mode: tokens of each request's own question")
    p.add_argument("--output-len", type=int, default=64,
                   help="prefix and lora modes: tokens generated per request")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="prefix, lora and server modes: the engine's token budget per step")
    p.add_argument("--repeats", type=int, default=3,
                   help="prefix and lora modes: runs of each configuration (figures are medians)")


@dataclass(frozen=True)
class PrefixRun:
    ttft_s: tuple[float, ...]  # one per request
    prompt_tokens_computed: int
    queries: int
    hits: int
    output_tokens: int
    wall_s: float

    @property
    def ttft_median_ms(self) -> float:
        return statistics.median(self.ttft_s) * 1e3

    @property
    def ttft_p99_ms(self) -> float:
        return percentile(self.ttft_s, 99) * 1e3

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s


def make_workload(streams: int, system_len: int, question_len: int, vocab_size: int,
                  shared: bool, seed: int) -> list[list[int]]:
    """``streams`` prompts of system_len + question_len tokens; the first system_len tokens are
    the same for all when ``shared``."""
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(3, vocab_size) for _ in range(n)]

    system = tokens(system_len)
    return [(system if shared else tokens(system_len)) + tokens(question_len)
            for _ in range(streams)]


def run_workload(engine: LLMEngine, prompts: list[list[int]], output_len: int,
                 caching: bool, tag: str) -> PrefixRun:
    """Submit every prompt at once on an emptied prefix cache and step until all finish."""
    engine.reset_prefix_cache(enable=caching)
    stats, counters = engine.scheduler.prefix_cache_stats, engine.counters
    queries0, hits0 = stats.queries, stats.hits
    computed0 = counters.num_prompt_tokens_computed
    first_token: dict[str, float] = {}
    output_tokens = 0
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, greedy(output_len))
    now = start
    while engine.has_work:
        deltas = engine.step()
        now = time.perf_counter()
        for d in deltas:
            output_tokens += len(d.token_ids)
            first_token.setdefault(d.request_id, now)
    if len(first_token) != len(prompts):
        raise RuntimeError("a request ended without a token")
    return PrefixRun(ttft_s=tuple(t - start for t in first_token.values()),
                     prompt_tokens_computed=counters.num_prompt_tokens_computed - computed0,
                     queries=stats.queries - queries0, hits=stats.hits - hits0,
                     output_tokens=output_tokens, wall_s=now - start)


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def ensure_checkpoint(model: Path, synth: bool, device: str) -> None:
    """A synthetic checkpoint at ``model`` if asked and missing: 13B shapes on a GPU, the tiny
    test model on the CPU."""
    if (model / "config.json").exists():
        return
    if not synth:
        raise SystemExit(f"{model} holds no checkpoint; pass --synth to write one")
    from engine.checkpoint.synth import SynthSpec, synthesize

    preset = "13b" if device == "cuda" else "tiny"
    synthesize(SynthSpec(preset, 4, 128, False, device=device), model)


def run(args: argparse.Namespace) -> list[Row]:
    device = resolve_device(args.device)
    ensure_checkpoint(args.model, args.synth, device)
    prompt_len = args.system_len + args.question_len
    config = EngineConfig(model=str(args.model), revision=None, offline=True, device=device,
                          max_model_len=prompt_len + args.output_len + 1,
                          max_num_seqs=args.streams,
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          gpu_memory_utilization=args.gpu_memory_utilization,
                          cuda_graphs=not args.no_cuda_graphs)
    engine = LLMEngine.from_config(config)
    vocab = engine.tokenizer.vocab_size
    info = engine.model_info
    rows = [Row(f"linear / attention: {info.linear_backend} / {info.attention_backend}; "
                f"{args.streams} streams of {args.system_len} + {args.question_len} prompt "
                f"tokens, {args.output_len} generated each; {args.max_num_batched_tokens} "
                f"tokens a step", 0, "")]
    runs: dict[tuple[str, bool], list[PrefixRun]] = {}
    for seed, shared in enumerate((True, False)):
        kind = "shared" if shared else "unique"
        prompts = make_workload(args.streams, args.system_len, args.question_len, vocab,
                                shared, seed)
        warm = make_workload(args.streams, args.system_len, args.question_len, vocab,
                             shared, seed + 100)
        for caching in (True, False):
            run_workload(engine, warm, 4, caching, f"warm-{kind}-{caching}")
        for rep in range(args.repeats):
            for caching in (True, False):
                runs.setdefault((kind, caching), []).append(run_workload(
                    engine, prompts, args.output_len, caching, f"{kind}-{caching}-{rep}"))
    figures = {key: _medians(reps) for key, reps in runs.items()}
    for (kind, caching), f in figures.items():
        label = f"{kind} prompts, caching {'on' if caching else 'off'}"
        rows += [Row(f"{label}: TTFT median", f.ttft_median_ms, "ms"),
                 Row(f"{label}: TTFT p99", f.ttft_p99_ms, "ms"),
                 Row(f"{label}: prompt tokens computed", f.prompt_tokens_computed, "tokens"),
                 Row(f"{label}: prefix cache hit rate", 100 * f.hit_rate, "%"),
                 Row(f"{label}: output throughput", f.output_tokens_per_s, "tok/s")]
    for kind in ("shared", "unique"):
        on, off = figures[kind, True], figures[kind, False]
        rows += [Row(f"{kind}: TTFT median, off / on", off.ttft_median_ms / on.ttft_median_ms,
                     "x"),
                 Row(f"{kind}: output throughput, on / off",
                     on.output_tokens_per_s / off.output_tokens_per_s, "x")]
    return rows


@dataclass(frozen=True)
class Figures:
    """One configuration's figures, each the median over its repeated runs."""

    ttft_median_ms: float
    ttft_p99_ms: float
    prompt_tokens_computed: float
    hit_rate: float
    output_tokens_per_s: float


def _medians(runs: list[PrefixRun]) -> Figures:
    def med(values: list[float]) -> float:
        return statistics.median(values)

    return Figures(ttft_median_ms=med([r.ttft_median_ms for r in runs]),
                   ttft_p99_ms=med([r.ttft_p99_ms for r in runs]),
                   prompt_tokens_computed=med([r.prompt_tokens_computed for r in runs]),
                   hit_rate=med([r.hit_rate for r in runs]),
                   output_tokens_per_s=med([r.output_tokens_per_s for r in runs]))
