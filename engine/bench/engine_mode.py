"""``gptq-serve bench engine``: our engine, exllamav2's generator and the bandwidth ceiling, in
one process on one card, as one table.
"""

from __future__ import annotations

import argparse
import gc
import logging
from pathlib import Path

import torch

from engine.bench.ceiling import Ceiling, copy_bandwidth_gbps, kv_bytes_per_token, weight_bytes
from engine.bench.engine_bench import (
    StructuredResults,
    bench_engine,
    bench_structured,
    last_logits,
    make_prompts,
    profile_decode_step,
    profile_prefill_step,
)
from engine.bench.table import Row
from engine.config import EngineConfig

log = logging.getLogger(__name__)


# (label, linear_backend, dense_weights): the default, the tensor-core kernel, exllamav2's
# kernel alone, and the previous default (exllamav2's kernel for small steps, a kept dense fp16
# copy above).
BACKENDS = {
    "triton": ("Triton kernels (+ exllamav2 where faster), packed", "triton", False),
    "mma": ("w4a16 tensor-core kernel (mma), packed", "mma", False),
    "exllama": ("exllamav2 kernel only, packed", "exllama", False),
    "dense": ("exllamav2 kernel + dense fp16 copy", "exllama", True),
}


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=Path("/tmp/13b"),
                   help="checkpoint folder (synthesised there first with --synth if missing)")
    p.add_argument("--synth", action="store_true",
                   help="write a synthetic 13B 4-bit g128 checkpoint at --model if it is missing")
    p.add_argument("--synth-bits", type=int, default=4, choices=[4, 8])
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batches", default="1,8,32,64,128",
                   help="concurrent sequences per decode run")
    p.add_argument("--backends", default="triton,exllama,dense",
                   help=f"linear backends to run, one after another: {', '.join(BACKENDS)}")
    p.add_argument("--no-exl2", action="store_true", help="skip exllamav2's own generator")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--profile-out", default=None,
                   help="write the GPU kernel table of one eager decode step here")
    p.add_argument("--profile-sequences", default="1",
                   help="sequences in the profiled decode steps, comma-separated (each sequence "
                        "after its own prefill; one table each, in one file)")


def ensure_checkpoint(args: argparse.Namespace) -> None:
    if (args.model / "config.json").exists():
        return
    if not args.synth:
        raise SystemExit(f"{args.model} holds no checkpoint; pass --synth to write one")
    from engine.checkpoint.synth import SynthSpec, synthesize

    synthesize(SynthSpec("13b", args.synth_bits, 128, False, device="cuda"), args.model)


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def run(args: argparse.Namespace) -> list[Row]:
    ensure_checkpoint(args)
    batches = tuple(int(b) for b in args.batches.split(","))
    names = [b for b in args.backends.split(",") if b]
    unknown = [b for b in names if b not in BACKENDS]
    if unknown:
        raise SystemExit(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
    prompt = None
    our_logits = None
    structured: StructuredResults | None = None  # the first backend's
    gpu_step_ms: dict[int, float] = {}  # sequences -> ms
    rows: list[Row] = []
    results = {}
    arch = None
    ckpt_gib = checkpoint_bytes(args.model) / 2**30
    for i, name in enumerate(names):
        label, linear_backend, dense = BACKENDS[name]
        config = EngineConfig(model=str(args.model), revision=None, offline=True, device="cuda",
                              max_model_len=2048, max_num_seqs=max(batches),
                              max_num_batched_tokens=2048, linear_backend=linear_backend,
                              dense_weights=dense,
                              gpu_memory_utilization=args.gpu_memory_utilization,
                              cuda_graphs=not args.no_cuda_graphs)
        engine, ours = bench_engine(config, args.prompt_len, args.new_tokens, batches)
        arch = engine.runner.model.arch
        if i == 0:
            prompt = make_prompts(1, args.prompt_len, engine.tokenizer.vocab_size, seed=1)[0]
            our_logits = last_logits(engine, prompt[:64])
            if 0 < args.structured_streams <= max(batches):
                structured = bench_structured(engine, args.structured_streams, args.prompt_len,
                                              args.new_tokens, args.structured_reps)
            if args.profile_out:
                with open(args.profile_out, "w") as f:
                    for n in (int(c) for c in args.profile_sequences.split(",")):
                        table, gpu_step_ms[n] = profile_decode_step(engine, prompt, n)
                        f.write(f"## one eager decode step, {n} sequence(s): "
                                f"{gpu_step_ms[n]:.2f} ms of GPU kernels\n{table}\n\n")
                    table, prefill_ms = profile_prefill_step(engine, prompt)
                    f.write(f"## the prefill step of one {len(prompt)}-token prompt: "
                            f"{prefill_ms:.2f} ms of GPU kernels\n{table}\n\n")
        blocks = engine.scheduler.block_manager
        model_gib = (engine.model_memory_bytes or 0) / 2**30
        results[name] = ours
        rows += [Row(f"[{name}] {label}: linear backend {ours.linear_backend}", 0, ""),
                 Row(f"[{name}] model on the card (checkpoint {ckpt_gib:.2f} GiB)", model_gib,
                     "GiB"),
                 Row(f"[{name}]   / checkpoint size", model_gib / ckpt_gib, "x"),
                 Row(f"[{name}] KV cache at gpu_memory_utilization {args.gpu_memory_utilization}",
                     blocks.num_blocks * blocks.block_size, "tokens"),
                 Row(f"[{name}] TTFT, {args.prompt_len}-token prompt", ours.ttft_ms, "ms")]
        del engine
        gc.collect()
        torch.cuda.empty_cache()

    assert arch is not None and prompt is not None and our_logits is not None
    ceiling = Ceiling(copy_bandwidth_gbps(), weight_bytes(args.model), kv_bytes_per_token(arch))
    # Mean context over a decode run: the prompt plus half the new tokens.
    context = args.prompt_len + args.new_tokens / 2
    head = [Row("copy bandwidth (read + write)", ceiling.bandwidth_gbps, "GB/s"),
            Row("weights read per decode step", ceiling.weight_bytes / 1e9, "GB")]
    exl2 = None
    if not args.no_exl2:
        from engine.bench.exl2_baseline import bench_exl2_generator

        try:
            exl2 = bench_exl2_generator(args.model, prompt, args.new_tokens, probe=prompt[:64])
        except Exception:  # the baseline failing must not hide our own figures
            log.exception("exllamav2's generator failed; its rows are left out")
    for n, ms in gpu_step_ms.items():
        head.append(Row(f"GPU kernel time of one eager decode step, {n} sequence(s) "
                        f"[{names[0]}]", ms, "ms"))
    if exl2 is not None and exl2.probe_logits is not None:
        theirs = exl2.probe_logits[:our_logits.shape[0]]
        head.append(Row(f"logits vs exllamav2's model, 64-token prompt [{names[0]}] (rel.)",
                        ((our_logits - theirs).norm() / theirs.norm()).item(), "rel"))
    if exl2 is not None:
        head.append(Row(f"TTFT, {args.prompt_len}-token prompt (exllamav2 generator)",
                        exl2.ttft_ms, "ms"))
    for batch in batches:
        ceil = ceiling.tokens_per_s(batch, context)
        label = "single-stream" if batch == 1 else f"aggregate, {batch} sequences"
        rows.append(Row(f"decode {label} (ceiling)", ceil, "tok/s"))
        for name, ours in results.items():
            run_ = next(r for r in ours.runs if r.batch == batch)
            rows.append(Row(f"decode {label} [{name}]", run_.tokens_per_s, "tok/s"))
            rows.append(Row(f"  [{name}] / ceiling", run_.tokens_per_s / ceil, "x"))
        if batch == 1 and exl2 is not None:
            rows.append(Row(f"decode {label} (exllamav2 generator)", exl2.decode_tokens_per_s,
                            "tok/s"))
    if structured is not None:
        from engine.bench.structured_mode import rows as structured_rows

        rows += [Row(f"[{names[0]}] {r.what}", r.value, r.unit)
                 for r in structured_rows(structured, args.structured_streams)]
    return head + rows
