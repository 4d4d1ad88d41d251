"""`gptq-serve bench server` and `bench transport` at small sizes: the sweep runs against a
server, every request ends with a finish reason, the engine-alone run measures each batch, and
the transport run carries every message. Their timings are not checked: benchmarks print
figures (docs/benchmarks.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.bench.cli import configure_parser
from engine.bench.server_sweep import engine_alone, engine_config, run, server_argv
from engine.bench.transport import TRANSPORTS, measure
from tests.fake_engine import ServerProcess


def bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return parser.parse_args(["server", *argv])


def test_the_sweep_reports_every_point_and_loses_no_request(tiny_checkpoint: Path,
                                                            tmp_path: Path) -> None:
    with ServerProcess.fake(tiny_checkpoint, tmp_path / "server.log", "--max-num-seqs", "8",
                            token_delay=0.002).start() as server:
        rows = {r.what: r.value for r in run(bench_args(
            "--base-url", server.url, "--concurrency", "1,4", "--num-requests", "6",
            "--prompt-len", "8", "--new-tokens", "5"))}
    for c in (1, 4):
        assert rows[f"[c={c}] requests: 6, failed (error or no finish reason)"] == 0
        assert rows[f"[c={c}] HTTP TPOT median"] > 0 and rows[f"[c={c}] HTTP TTFT p99"] > 0
        assert f"[c={c}] engine alone: step time" not in rows  # a running server: no engine run
    assert rows["first request of the sweep (after /ready): TTFT"] > 0


def test_the_engine_alone_run_and_the_server_share_one_configuration(
        tiny_checkpoint: Path) -> None:
    args = bench_args("--model", str(tiny_checkpoint), "--device", "cpu", "--prompt-len", "8",
                      "--new-tokens", "6", "--max-num-batched-tokens", "64")
    config = engine_config(args, "cpu", max_concurrency=3)
    assert config.max_num_seqs == 3 and config.max_model_len == 8 + 6 + 16
    argv = server_argv(config, 1234, 16)
    for flag, value in (("--max-num-seqs", "3"), ("--max-model-len", "30"),
                        ("--max-num-batched-tokens", "64"), ("--device", "cpu")):
        assert argv[argv.index(flag) + 1] == value
    tokens_per_s = engine_alone(config, 8, 6, [1, 3])
    assert set(tokens_per_s) == {1, 3} and all(v > 0 for v in tokens_per_s.values())


def test_every_transport_carries_every_message() -> None:
    for kind in TRANSPORTS:
        rows = {r.what.split(": ", 1)[1]: r.value for r in measure(kind, 30, 1.0, 4, True)}
        assert rows["message size"] > 0 and rows["decode, median"] > 0, kind
