"""`gptq-serve bench prefix` on the CPU with the tiny model, at a small size: it runs, and its
work counts (not its timings) are what the workloads imply."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from engine.bench.cli import configure_parser
from engine.bench.prefix_bench import run


def test_the_prefix_benchmark_counts_the_work_it_saves(tiny_checkpoint: Path) -> None:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args(["prefix", "--device", "cpu", "--model", str(tiny_checkpoint),
                              "--streams", "4", "--system-len", "48", "--question-len", "5",
                              "--output-len", "3", "--repeats", "1",
                              "--max-num-batched-tokens", "64"])
    rows = {r.what: r.value for r in run(args)}
    prompt_tokens = 4 * (48 + 5)
    # The first step prefills the first prompt and a chunk of the second, which therefore
    # computes its whole prompt too; the two admitted next reuse the system prompt's 3 blocks.
    assert rows["shared prompts, caching on: prompt tokens computed"] == prompt_tokens - 2 * 48
    assert rows["shared prompts, caching on: prefix cache hit rate"] == \
        pytest.approx(100 * 2 * 48 / prompt_tokens)
    for name in ("shared prompts, caching off", "unique prompts, caching on",
                 "unique prompts, caching off"):
        assert rows[f"{name}: prompt tokens computed"] == prompt_tokens, name
        assert rows[f"{name}: prefix cache hit rate"] == 0, name
    assert all(v > 0 for k, v in rows.items() if "TTFT" in k or "throughput" in k)
