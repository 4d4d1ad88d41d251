"""The `gptq-serve` command: serve, synth, bench.

The synth and bench subcommands import the engine (and torch) only when they run, so
`gptq-serve serve --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from app.settings import add_arguments, settings_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptq-serve",
        description="OpenAI-compatible server for Llama 2 GPTQ models.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a model over the OpenAI API",
                           usage="%(prog)s [FLAG ...]",
                           description="Every flag is also an environment variable "
                                       "GPTQ_<FLAG> (flags win). The flags, by group:",
                           argument_default=argparse.SUPPRESS)
    add_arguments(serve)
    synth = sub.add_parser("synth", help="write a synthetic GPTQ checkpoint (tests, demo, "
                                         "benchmarks)")
    bench = sub.add_parser("bench", help="engine and server benchmarks")
    if "synth" in sys.argv[1:2]:
        from engine.checkpoint.synth import configure_parser as synth_parser

        synth_parser(synth)
    if "bench" in sys.argv[1:2]:
        from engine.bench.cli import configure_parser as bench_parser

        bench_parser(bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["synth"]:
        from engine.checkpoint.synth import configure_parser, run

        return _delegate("synth", configure_parser, run, argv[1:])
    if argv[:1] == ["bench"]:
        from engine.bench.cli import configure_parser, run

        return _delegate("bench", configure_parser, run, argv[1:])
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"gptq-serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    from app.server import serve

    return serve(settings)


def _delegate(name: str, configure, run, argv: list[str]) -> int:  # noqa: ANN001
    parser = argparse.ArgumentParser(prog=f"gptq-serve {name}")
    configure(parser)
    return int(run(parser.parse_args(argv)) or 0)


if __name__ == "__main__":
    sys.exit(main())
