"""Our engine, driven step by step in-process: time to first token and decode throughput.

Every request is greedy, ignores EOS and generates exactly ``new_tokens`` tokens, so each run
does a known amount of work. Each measurement is preceded by a short warm-up run of the same
shape (Triton compiles a kernel the first time it meets a new configuration).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import statistics
import time
from dataclasses import dataclass

import torch

from engine.config import EngineConfig
from engine.core.batch import build_step_inputs
from engine.core.llm_engine import LLMEngine
from engine.core.scheduler import ScheduledSeq, SchedulerOutput
from engine.core.sequence import Sequence
from engine.params import Constraint, ConstraintKind, SamplingParams

_probe_ids = itertools.count(1 << 40)

# The constrained rows' schema: a few structured fields (integers with a range, an array of
# enums), then a string that cannot close before 100000 characters, so every row decodes
# exactly as many tokens as the unconstrained run while its mask is computed every step.
BENCH_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["id", "tags", "notes"],
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 999999},
        "tags": {"type": "array", "items": {"enum": ["alpha", "beta", "gamma"]},
                 "maxItems": 3},
        "notes": {"type": "string", "minLength": 100000}}}


@dataclass(frozen=True)
class DecodeRun:
    batch: int
    decode_tokens: int  # tokens generated once every sequence had its first token
    decode_s: float  # wall time of those steps
    # CPU time this process spent in them (every thread): on a shared CPU machine, a figure
    # other work disturbs far less than wall time.
    decode_cpu_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.decode_tokens / self.decode_cpu_s if self.decode_cpu_s else 0.0


def make_prompts(count: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Random token ids, avoiding the first few (BOS/EOS/UNK and friends)."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab_size) for _ in range(length)] for _ in range(count)]


def greedy(new_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)


def decode_run(engine: LLMEngine, prompts: list[list[int]], new_tokens: int,
               tag: str, constraint: Constraint | None = None,
               loras: list[str | None] | None = None) -> DecodeRun:
    """All prompts submitted at once (prompt i with LoRA adapter ``loras[i]``, None: the base
    model); decode throughput is measured from the step at which the last sequence got its
    first token (all prefills done) to the end."""
    params = dataclasses.replace(greedy(new_tokens), constraint=constraint)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, params,
                           lora=None if loras is None else loras[i])
    started: set[str] = set()
    t_all_started: float | None = None
    cpu_all_started = 0.0
    tokens = 0
    now = time.perf_counter()
    while engine.has_work:
        deltas = engine.step()
        now = time.perf_counter()
        if t_all_started is not None:
            tokens += sum(len(d.token_ids) for d in deltas)
            continue
        started.update(d.request_id for d in deltas)
        if len(started) == len(prompts):
            t_all_started, cpu_all_started = now, time.process_time()
    if t_all_started is None or tokens == 0:
        raise RuntimeError("the run ended before any pure decode step")
    return DecodeRun(len(prompts), tokens, now - t_all_started,
                     time.process_time() - cpu_all_started)


def time_to_first_token_ms(engine: LLMEngine, prompt: list[int], reps: int = 5) -> float:
    """Median wall time from add_request to the first token, the engine otherwise idle.

    Each repetition rotates the prompt by one more token (as the exllamav2 baseline does), so
    its first block differs and the prefix cache holds none of it: every repetition computes
    the whole prompt."""
    times = []
    for r in range(reps + 1):
        rotated = prompt[r:] + prompt[:r]
        start = time.perf_counter()
        engine.add_request(f"ttft-{r}", rotated, greedy(1))
        while engine.has_work:
            if engine.step():
                break
        elapsed = time.perf_counter() - start
        while engine.has_work:
            engine.step()
        if r > 0:  # the first is the warm-up
            times.append(elapsed * 1e3)
    return statistics.median(times)


@dataclass(frozen=True)
class StructuredResults:
    """Decode at the same streams with and without a JSON schema on every row, same engine,
    alternating runs; each is the best of ``reps``."""

    plain: DecodeRun
    constrained: DecodeRun
    # The runs that used the least CPU time per token (the same runs, or others).
    plain_cpu: DecodeRun
    constrained_cpu: DecodeRun

    @property
    def slowdown(self) -> float:
        return 1.0 - self.constrained.tokens_per_s / self.plain.tokens_per_s

    @property
    def cpu_slowdown(self) -> float:
        return 1.0 - self.constrained_cpu.tokens_per_cpu_s / self.plain_cpu.tokens_per_cpu_s


def bench_structured(engine: LLMEngine, streams: int, prompt_len: int, new_tokens: int,
                     reps: int = 3) -> StructuredResults:
    prompts = make_prompts(streams, prompt_len, engine.tokenizer.vocab_size, seed=streams + 7)
    constraint = Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(BENCH_SCHEMA), "bench")
    best: dict[bool, DecodeRun] = {}
    best_cpu: dict[bool, DecodeRun] = {}
    for rep in range(reps + 1):  # the first round warms both up (and compiles the grammar)
        for constrained in (False, True):
            run = decode_run(engine, prompts, new_tokens if rep else 4,
                             f"s{rep}{int(constrained)}", constraint if constrained else None)
            if not rep:
                continue
            if constrained not in best or run.tokens_per_s > best[constrained].tokens_per_s:
                best[constrained] = run
            if (constrained not in best_cpu
                    or run.tokens_per_cpu_s > best_cpu[constrained].tokens_per_cpu_s):
                best_cpu[constrained] = run
    if best[True].decode_tokens != best[False].decode_tokens:
        raise RuntimeError("a constrained row finished early; the runs are not comparable")
    return StructuredResults(best[False], best[True], best_cpu[False], best_cpu[True])


@dataclass(frozen=True)
class EngineResults:
    linear_backend: str
    attention_backend: str
    ttft_ms: float
    runs: tuple[DecodeRun, ...]


def bench_engine(config: EngineConfig, prompt_len: int, new_tokens: int,
                 batches: tuple[int, ...]) -> tuple[LLMEngine, EngineResults]:
    engine = LLMEngine.from_config(config)
    vocab = engine.tokenizer.vocab_size
    ttft = time_to_first_token_ms(engine, make_prompts(1, prompt_len, vocab, seed=1)[0])
    runs = []
    for batch in batches:
        prompts = make_prompts(batch, prompt_len, vocab, seed=batch)
        decode_run(engine, prompts, 4, f"warm{batch}")
        runs.append(decode_run(engine, prompts, new_tokens, f"b{batch}"))
    info = engine.model_info
    return engine, EngineResults(info.linear_backend, info.attention_backend, ttft, tuple(runs))


def last_logits(engine: LLMEngine, prompt: list[int]) -> torch.Tensor:
    """Last-position logits [V] float32 (CPU) of one prefill of ``prompt`` through the engine's
    paged path. Frees its blocks."""
    seq = Sequence(next(_probe_ids), "probe", list(prompt), SamplingParams(max_tokens=1))
    blocks, runner = engine.scheduler.block_manager, engine.runner
    blocks.allocate(seq, len(prompt))
    try:
        out = SchedulerOutput((ScheduledSeq(seq, len(prompt)),), ())
        inputs = build_step_inputs(out, blocks.block_size, runner.model.device)
        hidden = runner.model.forward(inputs.input_ids, inputs.positions, runner.kv_caches,
                                      inputs.meta)
        return runner.model.compute_logits(hidden[-1:])[0].float().cpu()
    finally:
        blocks.free(seq)


def profile_decode_step(engine: LLMEngine, prompt: list[int],
                        sequences: int = 1) -> tuple[str, float]:
    """Profile one eager (not graph-captured) decode forward of ``sequences`` sequences, each
    after a prefill of ``prompt``. -> (the kernel table, the summed GPU kernel time in ms):
    what the step costs on the GPU without any host overhead."""
    from torch.profiler import ProfilerActivity, profile

    blocks, runner = engine.scheduler.block_manager, engine.runner
    seqs = []
    try:
        for _ in range(sequences):
            seq = Sequence(next(_probe_ids), "profile", list(prompt),
                           SamplingParams(max_tokens=2))
            blocks.allocate(seq, len(prompt) + 1)
            seqs.append(seq)
            out = SchedulerOutput((ScheduledSeq(seq, len(prompt)),), ())
            inputs = build_step_inputs(out, blocks.block_size, runner.model.device)
            runner.model.forward(inputs.input_ids, inputs.positions, runner.kv_caches,
                                 inputs.meta)
            seq.num_computed_tokens += len(prompt)
            seq.append_token(prompt[-1])
        step = SchedulerOutput(tuple(ScheduledSeq(seq, 1) for seq in seqs), ())
        inputs = build_step_inputs(step, blocks.block_size, runner.model.device)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            hidden = runner.model.forward(inputs.input_ids, inputs.positions, runner.kv_caches,
                                          inputs.meta)
            runner.model.compute_logits(hidden)
            torch.cuda.synchronize()
    finally:
        for seq in seqs:
            blocks.free(seq)
    return kernel_table(prof)


def profile_prefill_step(engine: LLMEngine, prompt: list[int]) -> tuple[str, float]:
    """Profile the prefill forward of ``prompt`` (one step, the way the engine runs it: the
    step graphs when they take its size, else eagerly) and its last token's logits: what the
    first token costs on the GPU. -> as profile_decode_step."""
    from torch.profiler import ProfilerActivity, profile

    blocks, runner = engine.scheduler.block_manager, engine.runner
    seq = Sequence(next(_probe_ids), "profile", list(prompt), SamplingParams(max_tokens=2))
    blocks.allocate(seq, len(prompt) + 1)
    try:
        out = SchedulerOutput((ScheduledSeq(seq, len(prompt)),), ())
        inputs = build_step_inputs(out, blocks.block_size, runner.model.device)

        def forward() -> None:
            runner.model.compute_logits(runner.forward(inputs)[-1:])
            torch.cuda.synchronize()

        forward()  # warm-up
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            forward()
    finally:
        blocks.free(seq)
    return kernel_table(prof)


def kernel_table(prof: torch.profiler.profile) -> tuple[str, float]:
    averages = prof.key_averages()
    return (averages.table(sort_by="self_device_time_total", row_limit=30),
            sum(a.self_device_time_total for a in averages) / 1e3)
