"""`gptq-serve bench lora` on the CPU with the tiny model, at a small size: it runs, writes
real PEFT-format adapters of the asked rank on all seven projections, and reports both
workloads."""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.bench.cli import configure_parser
from engine.bench.lora_bench import run
from engine.checkpoint.arch import read_arch_config
from engine.lora.peft import load_adapter
from engine.lora.spec import TARGET_MODULES, LoraSpec


def test_the_lora_benchmark_runs_both_workloads(tiny_checkpoint: Path, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args(["lora", "--device", "cpu", "--model", str(tiny_checkpoint),
                              "--streams", "6", "--adapters", "3", "--lora-rank", "4",
                              "--lora-prompt-len", "8", "--output-len", "3", "--repeats", "1",
                              "--max-num-batched-tokens", "64", "--lora-dir", str(tmp_path)])
    rows = {r.what: r.value for r in run(args)}
    assert rows["6 streams on the base model: decode throughput"] > 0
    assert rows["6 streams over 3 adapters: decode throughput"] > 0
    assert rows["LoRA / base decode throughput"] > 0
    arch = read_arch_config(tiny_checkpoint)
    adapters = [load_adapter(LoraSpec(f"a{i}", str(p)), arch, 4)
                for i, p in enumerate(sorted(tmp_path.iterdir()))]
    assert len(adapters) == 3
    assert all(a.rank == 4 and a.target_modules == TARGET_MODULES for a in adapters)
