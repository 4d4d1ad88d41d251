"""``gptq-serve bench``: engine, server and kernel benchmarks on one GPU, and the prefix-caching
and LoRA benchmarks (on a GPU or the CPU).

The app's CLI delegates here: ``configure_parser(p)`` adds the options, ``run(args)`` runs the
chosen mode and prints one table; the exit status is 0 on success.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from engine.bench import (
    engine_mode,
    kernels,
    lora_bench,
    prefix_bench,
    server_sweep,
    structured_mode,
    transport,
)
from engine.bench.table import Row


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("mode", nargs="?", default="engine",
                   choices=["engine", "server", "kernels", "prefix", "structured", "lora",
                            "transport"],
                   help="engine: our engine, exllamav2's generator and the bandwidth ceiling on "
                        "one checkpoint; server: streams through a gptq-serve server at each "
                        "concurrency of a sweep (vLLM's TTFT/TPOT/ITL/latency/throughput) "
                        "beside the engine alone in the same run (GPU or CPU); kernels: copy "
                        "bandwidth, exllama crossover per 13B layer shape, paged attention; "
                        "prefix: prefix caching on and off on a shared system prompt and on "
                        "unique prompts (GPU or CPU); structured: decode with and without a "
                        "JSON schema on every row (GPU or CPU); lora: decode with streams "
                        "spread over LoRA adapters against streams on the base model (GPU or "
                        "CPU); transport: what carrying a step's outputs between two "
                        "processes costs, per transport (CPU)")
    p.add_argument("--json-out", default=None, help="also write the rows to this JSON file")
    engine_mode.configure_parser(p)
    server_sweep.configure_parser(p)
    transport.configure_parser(p)
    kernels.configure_parser(p)
    prefix_bench.configure_parser(p)
    structured_mode.configure_parser(p)
    lora_bench.configure_parser(p)


def run(args: argparse.Namespace) -> int:
    if args.mode == "server":
        # The device is the server's (and the engine-alone run's, in a child process before
        # it); this process only sends requests.
        where = args.base_url or prefix_bench.device_name(prefix_bench.resolve_device(
            args.device))
        return _print(where, args, server_sweep.run(args))
    if args.mode == "transport":
        return _print(prefix_bench.device_name("cpu"), args, transport.run(args))
    if args.mode in ("prefix", "structured", "lora"):
        device = prefix_bench.resolve_device(args.device)
        run_mode = {"prefix": prefix_bench.run, "structured": structured_mode.run,
                    "lora": lora_bench.run}[args.mode]
        return _print(prefix_bench.device_name(device), args, run_mode(args))
    import torch

    if not torch.cuda.is_available():
        print("gptq-serve bench engine/kernels needs an NVIDIA GPU", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name(0)
    rows = engine_mode.run(args) if args.mode == "engine" else kernels.run(args)
    return _print(card, args, rows)


def _print(card: str, args: argparse.Namespace, rows: list[Row]) -> int:
    width = max(len(r.what) for r in rows)
    print(f"\n## {args.mode} on {card}")
    for r in rows:
        value = f"{r.value:>12.2f}" if r.unit else ""
        print(f"{r.what:<{width}}  {value} {r.unit}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(
            {"card": card, "mode": args.mode, "rows": [asdict(r) for r in rows]}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    # The measured kernel timings behind each layer shape's plan belong in a benchmark's log.
    logging.getLogger("engine.model.linear.triton_backend").setLevel(logging.DEBUG)
    parser = argparse.ArgumentParser(prog="gptq-serve bench", description=__doc__)
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
