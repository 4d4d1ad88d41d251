"""``gptq-serve bench lora``: decode throughput with LoRA adapters against the base model, in
one process on one loaded model.

Two workloads of ``--streams`` requests submitted at once (greedy, EOS ignored, exactly
``--output-len`` tokens each, ``--lora-prompt-len``-token random prompts): every stream on the
base model, and the streams spread evenly over ``--adapters`` synthetic adapters of rank
``--lora-rank`` on all seven projections (as many device slots as adapters, so no swapping
during the run). The engine serves LoRA in both runs: the base run is what a LoRA-enabled
server gives its base-model requests. Decode throughput is counted from the step at which every
stream had its first token to the end (engine_bench.decode_run). Each configuration runs
``--repeats`` times, alternating, after a warm-up of each; figures are medians.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from engine.bench.engine_bench import DecodeRun, decode_run, make_prompts
from engine.bench.prefix_bench import ensure_checkpoint, resolve_device
from engine.bench.table import Row
from engine.config import EngineConfig
from engine.core.llm_engine import LLMEngine
from engine.lora.peft import CONFIG_FILE
from engine.lora.spec import TARGET_MODULES, LoraConfig, LoraSpec
from engine.lora.synth import AdapterSpec, write_adapter


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapters", type=int, default=4,
                   help="lora mode: synthetic adapters the streams are spread over")
    p.add_argument("--lora-rank", type=int, default=16, help="lora mode: the adapters' rank")
    p.add_argument("--lora-prompt-len", type=int, default=64,
                   help="lora mode: prompt tokens per stream")
    p.add_argument("--lora-dir", type=Path, default=None,
                   help="lora mode: where the adapters are written (default: beside --model)")


def make_adapters(model: Path, folder: Path, count: int, rank: int) -> list[LoraSpec]:
    """``count`` adapters of ``rank`` on every projection (written once, then reused)."""
    specs = []
    for i in range(count):
        out = folder / f"bench-r{rank}-{i}"
        if not (out / CONFIG_FILE).is_file():
            write_adapter(model, out, AdapterSpec(rank=rank, alpha=2.0 * rank, seed=i,
                                                  target_modules=TARGET_MODULES))
        specs.append(LoraSpec(f"bench-{i}", str(out)))
    return specs


def run(args: argparse.Namespace) -> list[Row]:
    device = resolve_device(args.device)
    ensure_checkpoint(args.model, args.synth, device)
    folder = args.lora_dir or args.model.parent / f"{args.model.name}-lora"
    specs = make_adapters(args.model, folder, args.adapters, args.lora_rank)
    config = EngineConfig(model=str(args.model), revision=None, offline=True, device=device,
                          max_model_len=args.lora_prompt_len + args.output_len + 1,
                          max_num_seqs=args.streams,
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          gpu_memory_utilization=args.gpu_memory_utilization,
                          cuda_graphs=not args.no_cuda_graphs,
                          lora=LoraConfig(max_loras=args.adapters,
                                          max_lora_rank=args.lora_rank, adapters=tuple(specs)))
    engine = LLMEngine.from_config(config)
    info = engine.model_info
    prompts = make_prompts(args.streams, args.lora_prompt_len, engine.tokenizer.vocab_size)
    workloads: dict[str, list[str | None]] = {
        "base": [None] * args.streams,
        "lora": [specs[i % len(specs)].name for i in range(args.streams)]}
    for kind, loras in workloads.items():
        decode_run(engine, prompts, 4, f"warm-{kind}", loras=loras)
    runs: dict[str, list[DecodeRun]] = {kind: [] for kind in workloads}
    for rep in range(args.repeats):
        for kind, loras in workloads.items():
            runs[kind].append(decode_run(engine, prompts, args.output_len, f"{kind}-{rep}",
                                         loras=loras))
    tok_s = {kind: statistics.median(r.tokens_per_s for r in reps)
             for kind, reps in runs.items()}
    assert engine.runner.lora_slots is not None
    rows = [Row(f"linear / attention: {info.linear_backend} / {info.attention_backend}; "
                f"{args.streams} streams, {args.lora_prompt_len} prompt + {args.output_len} "
                f"generated tokens each; LoRA: {args.adapters} adapters of rank "
                f"{args.lora_rank} on {', '.join(TARGET_MODULES)}", 0, ""),
            Row("LoRA slots on the device", engine.runner.lora_slots.device_bytes / 2**20, "MiB")]
    for kind, label in (("base", f"{args.streams} streams on the base model"),
                        ("lora", f"{args.streams} streams over {args.adapters} adapters")):
        rows += [Row(f"{label}: decode throughput", tok_s[kind], "tok/s"),
                 Row(f"{label}: decode step", 1e3 * args.streams / tok_s[kind], "ms")]
    rows.append(Row("LoRA / base decode throughput", tok_s["lora"] / tok_s["base"], "x"))
    return rows
