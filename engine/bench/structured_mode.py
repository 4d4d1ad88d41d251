"""``gptq-serve bench structured``: decode throughput at N streams with and without a JSON
schema constraint on every row, in one engine, on any device (the tiny model on a CPU, the
synthetic 13B on a GPU). ``bench engine`` prints the same rows after its own."""

from __future__ import annotations

import argparse

from engine.bench.engine_bench import StructuredResults, bench_structured
from engine.bench.table import Row
from engine.config import EngineConfig
from engine.core.llm_engine import LLMEngine


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--structured-streams", type=int, default=32,
                   help="concurrent sequences of the constrained-decoding rows (0: skip them "
                        "in bench engine)")
    p.add_argument("--structured-reps", type=int, default=3,
                   help="alternating runs of each kind; the best of each is reported (other "
                        "load only slows a run down)")


def rows(result: StructuredResults, streams: int, cpu_time: bool = False) -> list[Row]:
    """``cpu_time``: also the throughput per CPU-second of this process (for a CPU run on a
    shared machine, where wall time mostly measures the neighbours)."""
    out = [Row(f"decode aggregate, {streams} sequences, unconstrained",
               result.plain.tokens_per_s, "tok/s"),
           Row(f"decode aggregate, {streams} sequences, JSON schema on every row",
               result.constrained.tokens_per_s, "tok/s"),
           Row("  constrained slowdown", 100 * result.slowdown, "%")]
    if cpu_time:
        out += [Row(f"decode per CPU-second, {streams} sequences, unconstrained",
                    result.plain_cpu.tokens_per_cpu_s, "tok/cpu-s"),
                Row(f"decode per CPU-second, {streams} sequences, JSON schema on every row",
                    result.constrained_cpu.tokens_per_cpu_s, "tok/cpu-s"),
                Row("  constrained slowdown (CPU time)", 100 * result.cpu_slowdown, "%")]
    return out


def run(args: argparse.Namespace) -> list[Row]:
    """Uses prefix mode's --device (auto, cpu, cuda)."""
    from engine.bench.engine_mode import ensure_checkpoint

    ensure_checkpoint(args)
    streams = args.structured_streams
    config = EngineConfig(model=str(args.model), revision=None, offline=True,
                          device=args.device, max_model_len=2048, max_num_seqs=streams,
                          max_num_batched_tokens=max(2048, streams),
                          gpu_memory_utilization=args.gpu_memory_utilization,
                          kv_cache_memory_gb=2.0, cuda_graphs=not args.no_cuda_graphs)
    engine = LLMEngine.from_config(config)
    info = engine.model_info
    result = bench_structured(engine, streams, args.prompt_len, args.new_tokens,
                              args.structured_reps)
    return [Row(f"linear / attention backends: {info.linear_backend} / "
                f"{info.attention_backend}, {info.device}", 0, ""),
            *rows(result, streams, cpu_time=info.device == "cpu")]
