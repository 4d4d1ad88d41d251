"""``gptq-serve bench server``: streams through a real ``gptq-serve serve`` at each concurrency
of a sweep, beside the engine alone on the same card in the same run.

With ``--model`` (the default) the benchmark runs, one after another on the same device:

1. the engine alone, in a child process that exits afterwards (so the server gets the whole
   card): the same engine settings, warmed up like the server, then for each concurrency c,
   c sequences of ``--prompt-len`` prompt tokens decoding ``--new-tokens`` tokens together
   (engine/bench/engine_bench.py's decode run): aggregate tok/s and the time of one step;
2. ``gptq-serve serve`` on the same settings, started here, then for each concurrency c,
   ``--num-requests`` streaming requests (default 2c, at least 8), c at a time, measured with
   vLLM's definitions (engine/bench/server_bench.py); the first request of the first sweep is
   the first request after /ready turned 200. Then SIGTERM, and the server's exit status.

Beside each concurrency it prints the ratios the targets are stated in: TPOT median over the
engine's step time, ITL p99 over ITL median, and (one stream) the engine's step time over
TPOT. With ``--base-url`` it measures a server already running instead (no engine-alone rows).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx

from engine.bench.server_bench import LoadFigures, LoadSpec, figures, run_load, served_model
from engine.bench.table import Row
from engine.config import EngineConfig

log = logging.getLogger(__name__)


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default=None,
                   help="server mode: measure this running server instead of starting one over "
                        "--model (no engine-alone figures then)")
    p.add_argument("--served-model", default=None,
                   help="server mode: model name for requests (default: the first of /v1/models)")
    p.add_argument("--concurrency", default="1,8,32,64,128",
                   help="server mode: streams at once, one sweep point each (comma-separated)")
    p.add_argument("--num-requests", type=int, default=None,
                   help="server mode: requests per sweep point (default: 2 x concurrency, "
                        "at least 8)")
    p.add_argument("--vocab-size", type=int, default=1000,
                   help="server mode: prompt token ids are drawn from [3, vocab-size)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--server-log", default=None,
                   help="server mode: where the started server writes its log (default: a "
                        "temporary file, named in the output)")
    p.add_argument("--server-start-timeout", type=float, default=900.0,
                   help="server mode: seconds the started server may take to turn ready")


def sweep_points(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(concurrency, requests) per sweep point."""
    points = [int(c) for c in args.concurrency.split(",") if c.strip()]
    return [(c, args.num_requests or max(2 * c, 8)) for c in points]


def engine_config(args: argparse.Namespace, device: str, max_concurrency: int) -> EngineConfig:
    """What both the engine alone and the server run with."""
    return EngineConfig(model=str(args.model), revision=None, offline=True, device=device,
                        max_model_len=args.prompt_len + args.new_tokens + 16,
                        max_num_seqs=max_concurrency,
                        max_num_batched_tokens=args.max_num_batched_tokens,
                        gpu_memory_utilization=args.gpu_memory_utilization,
                        cuda_graphs=not args.no_cuda_graphs)


def server_argv(config: EngineConfig, port: int, max_queued: int) -> list[str]:
    flags = {"--model": config.model, "--device": config.device,
             "--max-model-len": config.max_model_len, "--max-num-seqs": config.max_num_seqs,
             "--max-num-batched-tokens": config.max_num_batched_tokens,
             "--gpu-memory-utilization": config.gpu_memory_utilization,
             "--max-queued-requests": max_queued, "--served-model-name": "bench",
             "--host": "127.0.0.1", "--port": port}
    argv = [sys.executable, "-m", "app.cli", "serve"]
    for flag, value in flags.items():
        argv += [flag, str(value)]
    return argv + ([] if config.cuda_graphs else ["--no-cuda-graphs"])


def engine_alone(config: EngineConfig, prompt_len: int, new_tokens: int,
                 batches: list[int]) -> dict[int, float]:
    """In a child process: aggregate decode tok/s of the warmed-up engine at each batch."""
    from engine.bench.engine_bench import decode_run, make_prompts
    from engine.core.llm_engine import LLMEngine
    from engine.core.warmup import warm_up

    engine = LLMEngine.from_config(config)
    warm_up(engine)
    vocab = engine.tokenizer.vocab_size
    result = {}
    for batch in batches:
        prompts = make_prompts(batch, prompt_len, vocab, seed=batch)
        decode_run(engine, prompts, 4, f"warm{batch}")
        result[batch] = decode_run(engine, prompts, new_tokens, f"b{batch}").tokens_per_s
    return result


def run(args: argparse.Namespace) -> list[Row]:
    points = sweep_points(args)
    if args.base_url is not None:
        return _sweep(args.base_url, args, points, alone=None)
    from engine.bench.prefix_bench import ensure_checkpoint, resolve_device

    device = resolve_device(args.device)
    ensure_checkpoint(args.model, args.synth, device)
    config = engine_config(args, device, max(c for c, _ in points))
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn) as pool:
        alone = pool.submit(engine_alone, config, args.prompt_len, args.new_tokens,
                            [c for c, _ in points]).result()
    max_queued = max(n for _, n in points)
    port = _free_port()
    log_path = Path(args.server_log or tempfile.mkstemp(prefix="gptq-bench-server-",
                                                        suffix=".log")[1])
    with log_path.open("wb") as server_log:
        server = subprocess.Popen(server_argv(config, port, max_queued), stdout=server_log,
                                  stderr=subprocess.STDOUT, env=os.environ.copy())
    base_url = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        _wait_ready(base_url, server, args.server_start_timeout, log_path)
        rows = [Row(f"server ready in (load, warm-up; log: {log_path})",
                    time.monotonic() - started, "s")]
        rows += _sweep(base_url, args, points, alone)
        server.send_signal(signal.SIGTERM)
        rows.append(Row("server exit status after SIGTERM", server.wait(120), "(status)"))
        return rows
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(30)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(base_url: str, server: subprocess.Popen[bytes], timeout: float,
                log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited ({server.returncode}); see {log_path}")
        try:
            if httpx.get(base_url + "/ready", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server was not ready within {timeout:.0f} s; see {log_path}")


def _sweep(base_url: str, args: argparse.Namespace, points: list[tuple[int, int]],
           alone: dict[int, float] | None) -> list[Row]:
    model = args.served_model or asyncio.run(served_model(base_url, args.api_key))
    rows = [Row(f"{args.prompt_len} prompt / {args.new_tokens} new tokens a request, greedy, "
                f"EOS ignored", 0, "")]
    first_ttft: float | None = None
    single_ttft: float | None = None
    for concurrency, num_requests in points:
        spec = LoadSpec(concurrency, num_requests, args.prompt_len, args.new_tokens,
                        args.vocab_size, seed=concurrency)
        records, duration = asyncio.run(run_load(base_url, model, spec, args.api_key))
        if first_ttft is None and records and records[0].error is None:
            first_ttft = records[0].ttft_s * 1e3
        f = figures(records, duration)
        errors = [r.error for r in records if r.error]
        if errors:
            print(f"concurrency {concurrency}: {len(errors)} requests failed; first: "
                  f"{errors[0]}")
        rows += _point_rows(concurrency, num_requests, f, len(errors),
                            None if alone is None else alone.get(concurrency))
        if concurrency == 1 and f is not None:
            single_ttft = f.ttft_median
    if first_ttft is not None:
        rows.append(Row("first request of the sweep (after /ready): TTFT", first_ttft, "ms"))
        if single_ttft:
            rows.append(Row("  / TTFT median at concurrency 1", first_ttft / single_ttft, "x"))
    return rows


def _point_rows(c: int, n: int, f: LoadFigures | None, failed: int,
                alone_tps: float | None) -> list[Row]:
    tag = f"[c={c}]"
    rows = [Row(f"{tag} requests: {n}, failed (error or no finish reason)", failed,
                "requests")]
    if f is None:
        return rows
    rows += [Row(f"{tag} HTTP TTFT median", f.ttft_median, "ms"),
             Row(f"{tag} HTTP TTFT p99", f.ttft_p99, "ms"),
             Row(f"{tag} HTTP TPOT median", f.tpot_median, "ms"),
             Row(f"{tag} HTTP TPOT mean", f.tpot_mean, "ms"),
             Row(f"{tag} HTTP TPOT p99", f.tpot_p99, "ms"),
             Row(f"{tag} HTTP ITL median", f.itl_median, "ms"),
             Row(f"{tag} HTTP ITL p99", f.itl_p99, "ms"),
             Row(f"{tag} HTTP ITL p99 / median", f.itl_p99 / f.itl_median
                 if f.itl_median else 0.0, "x"),
             Row(f"{tag} HTTP E2E latency median", f.e2e_median, "ms"),
             Row(f"{tag} HTTP output throughput (prefill and ramp included)",
                 f.output_tokens_per_s, "tok/s")]
    if alone_tps is not None:
        step_ms = c / alone_tps * 1e3
        rows += [Row(f"{tag} engine alone: decode, {c} sequences", alone_tps, "tok/s"),
                 Row(f"{tag} engine alone: step time", step_ms, "ms"),
                 Row(f"{tag} HTTP TPOT median / engine step time", f.tpot_median / step_ms,
                     "x")]
    return rows
