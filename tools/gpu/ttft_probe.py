"""Where the time to first token goes: one 512-token prompt through the engine on the synthetic
13B (tools/gpu/mma.sh makes it), timed by phase and traced once (CPU and CUDA) into
$OUT/ttft_trace.json.gz for reading off the device.

Usage (device machine, after tools/gpu/setup.sh): python3 tools/gpu/ttft_probe.py
"""

from __future__ import annotations

import gzip
import json
import os
import statistics
import time

import torch

from engine.bench.engine_bench import greedy, make_prompts, time_to_first_token_ms
from engine.config import EngineConfig
from engine.core.batch import build_step_inputs
from engine.core.llm_engine import LLMEngine
from engine.core.scheduler import ScheduledSeq, SchedulerOutput
from engine.core.sequence import Sequence
from engine.params import SamplingParams


def forward_timing(engine: LLMEngine, prompt: list[int], reps: int = 5) -> None:
    """The prefill forward as the runner does it (through the step graphs; eagerly with
    STEP_GRAPHS=0): host time to queue it, and wall time until the GPU is done."""
    blocks, runner = engine.scheduler.block_manager, engine.runner
    queued, total = [], []
    for r in range(reps + 1):
        seq = Sequence(10**9 + r, "probe", prompt[r:] + prompt[:r], SamplingParams(max_tokens=2))
        blocks.allocate(seq, len(prompt) + 1)
        out = SchedulerOutput((ScheduledSeq(seq, len(prompt)),), ())
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        inputs = build_step_inputs(out, blocks.block_size, runner.model.device)
        runner.model.compute_logits(runner.forward(inputs)[-1:])
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        blocks.free(seq)
        if r:
            queued.append((t1 - t0) * 1e3)
            total.append((t2 - t0) * 1e3)
    print(f"prefill forward: host queues it in {statistics.median(queued):.2f} ms, "
          f"done after {statistics.median(total):.2f} ms (median of {reps})")


def traced_ttft(engine: LLMEngine, prompt: list[int], out_dir: str) -> None:
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for r in range(2):
            with record_function(f"ttft-rep-{r}"):
                engine.add_request(f"trace-{r}", prompt[r + 7:] + prompt[:r + 7], greedy(1))
                while engine.has_work:
                    if engine.step():
                        break
            while engine.has_work:
                engine.step()
    path = "/tmp/ttft_trace.json"
    prof.export_chrome_trace(path)
    with open(path, "rb") as f, gzip.open(os.path.join(out_dir, "ttft_trace.json.gz"), "wb") as g:
        g.write(f.read())
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    mark = [e for e in events if e.get("name") == "ttft-rep-1" and e.get("ph") == "X"][0]
    start, end = mark["ts"], mark["ts"] + mark["dur"]
    inside = [k for k in kernels if start <= k["ts"] <= end]
    busy = sum(k["dur"] for k in inside)
    gaps = [(b["ts"] - (a["ts"] + a["dur"]), a["name"][:60], b["name"][:60])
            for a, b in zip(inside, inside[1:], strict=False)]
    print(f"traced TTFT {mark['dur'] / 1e3:.2f} ms: {len(inside)} kernels, {busy / 1e3:.2f} ms "
          f"busy; first kernel at +{(inside[0]['ts'] - start) / 1e3:.2f} ms, last ends "
          f"{(end - inside[-1]['ts'] - inside[-1]['dur']) / 1e3:.2f} ms before the end")
    big = sorted(gaps, reverse=True)[:12]
    print(f"GPU idle between kernels: {sum(g for g, _, _ in gaps if g > 0) / 1e3:.2f} ms; "
          "largest:")
    for g, a, b in big:
        print(f"  {g:8.1f} us  after {a} | before {b}")


def main() -> None:
    config = EngineConfig(model="/tmp/13b", revision=None, offline=True, device="cuda",
                          max_model_len=2048, max_num_seqs=128, max_num_batched_tokens=2048,
                          linear_backend=os.environ.get("LINEAR", "mma"),
                          gpu_memory_utilization=0.9, cuda_graphs=True,
                          cuda_graph_max_tokens=int(os.environ.get("STEP_GRAPHS", "512")))
    engine = LLMEngine.from_config(config)
    prompt = make_prompts(1, 512, engine.tokenizer.vocab_size, seed=1)[0]
    print(f"TTFT (bench method) {time_to_first_token_ms(engine, prompt):.2f} ms")
    forward_timing(engine, prompt)
    traced_ttft(engine, prompt, os.environ.get("OUT", "/tmp"))


if __name__ == "__main__":
    main()
