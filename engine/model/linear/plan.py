"""Which kernel serves which step size, per layer shape: candidates, measurement, the plan.

At load the backend times, for every step size the engine meets (a ladder of powers of two up
to ``max_num_batched_tokens``), each candidate path on real layers of the shape, rotating over
several layers so the weights stream from memory as in a forward pass, and keeps the fastest.
A step of T tokens then takes the choice measured at the smallest ladder size >= T.

Candidates: for layers in the Triton/exllamav2 layout, exllamav2's 4-bit kernel (up to 16
tokens) and the Triton kernels with a few tile shapes and input-dimension splits chosen from the
multiprocessor count; for layers in the tensor-core kernel's layout (``mma.py``), that kernel
with each of its block widths and K splits (up to ``mma.MAX_TOKENS``), on Hopper its wgmma
form too (from ``mma.WGMMA_MIN_TOKENS``; K splits and stream-K grids); for both, the dense path (from 32
tokens). The Triton tile shapes are the ones the H200 sweep in tools/gpu kept
(docs/benchmarks.md); the split sizes follow the card's multiprocessor count.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.model.linear import mma
from engine.model.linear.gptq_triton import KernelConfig

if TYPE_CHECKING:
    from engine.model.linear.triton_backend import PackedLinear

# Token counts at which the paths are timed; a plan entry covers the sizes up to its own.
LADDER = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
MAX_SPLIT_TOKENS = 64  # above this the grid is large enough without splitting K
EXLLAMA_MAX_TOKENS = 16  # its kernel re-reads the weights per 4 rows: never a candidate above
DENSE_MIN_TOKENS = 32


class PathKind(enum.Enum):
    EXLLAMA = "exllama"
    TRITON = "triton"
    MMA = "mma"  # the w4a16 tensor-core kernel (mma.py), mma.sync
    WGMMA = "wgmma"  # the same on Hopper's warpgroup MMA
    DENSE = "dense"


@dataclass(frozen=True)
class Path:
    kind: PathKind
    config: KernelConfig | None = None  # TRITON only; None: ``default_config``
    split_k: int = 1  # MMA and WGMMA only
    block_n: int = 128  # MMA and WGMMA only: output rows a block and (MMA only)
    k_warps: int = 1  # warps sharing a tile along K (one of mma.GEOMETRIES)
    stream_k: int = 0  # WGMMA only: persistent blocks a token block of a stream-K launch

    def describe(self) -> str:
        if self.kind is PathKind.MMA:
            k = f"k{self.k_warps}" if self.k_warps > 1 else ""
            return f"mma{self.block_n}{k}/{self.split_k}"
        if self.kind is PathKind.WGMMA:
            share = f"sk{self.stream_k}" if self.stream_k else str(self.split_k)
            return f"wgmma{self.block_n}/{share}"
        if self.kind is not PathKind.TRITON or self.config is None:
            return self.kind.value
        c = self.config
        kernel = "gemv" if c.block_m == 1 else f"gemm{c.block_m}x{c.block_n}"
        return f"triton {kernel}/{c.split_k}"


def default_config(num_tokens: int) -> KernelConfig:
    """A configuration that needs no workspace, for use before a plan is measured."""
    if num_tokens == 1:
        return KernelConfig(128, 1, 1, 4, 1)
    return KernelConfig(64, 16 if num_tokens <= 16 else 64, 1, 4, 2)


@dataclass(frozen=True)
class StepPlan:
    # (largest step size, path), ascending; sizes past the last entry take the last path.
    entries: tuple[tuple[int, Path], ...]
    # What was measured: (step size, ((path, ms), ...)), for the logs and the benchmarks.
    timings: tuple[tuple[int, tuple[tuple[Path, float], ...]], ...] = ()

    def describe_timings(self) -> str:
        """e.g. "T=1: exllama 22.7us, triton gemv/8 27.4us | T=2: ..." (fastest first)."""
        return " | ".join(
            f"T={t}: " + ", ".join(f"{p.describe()} {ms * 1e3:.1f}us"
                                   for p, ms in sorted(times, key=lambda pm: pm[1]))
            for t, times in self.timings)

    @classmethod
    def single(cls, path: Path) -> StepPlan:
        return cls(((1 << 30, path),))

    def pick(self, num_tokens: int) -> Path:
        for limit, path in self.entries:
            if num_tokens <= limit:
                return path
        return self.entries[-1][1]

    def uses(self, kind: PathKind) -> bool:
        return any(p.kind is kind for _, p in self.entries)

    def describe(self) -> str:
        """e.g. "<=1 triton gemv/8, <=8 exllama, <=64 triton gemm16x128/4, >64 dense"."""
        merged: list[tuple[int, Path]] = []
        for limit, path in self.entries:
            if merged and merged[-1][1] == path:
                merged[-1] = (limit, path)
            else:
                merged.append((limit, path))
        parts = [f"<={limit} {path.describe()}" for limit, path in merged[:-1]]
        parts.append(f"{'>' + str(merged[-2][0]) if len(merged) > 1 else 'all'} "
                     f"{merged[-1][1].describe()}")
        return ", ".join(parts)


def plan_signature(layer: PackedLinear) -> tuple:
    """Layers with the same signature get the same plan."""
    return layer.signature()


def _floor_pow2(x: float, cap: int = 16) -> int:
    p = 1
    while p * 2 <= x and p * 2 <= cap:
        p *= 2
    return p


def num_sms() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def triton_candidates(num_tokens: int, n: int, sms: int) -> list[KernelConfig]:
    """The Triton configurations timed at ``num_tokens`` for a layer with n outputs."""
    def split(block_n: int, waves: int) -> int:
        return _floor_pow2(waves * sms / -(-n // block_n))

    if num_tokens == 1:
        return [KernelConfig(bn, 1, s, 4, 1) for bn in (128, 256)
                for s in sorted({max(1, split(bn, 8) // 2), split(bn, 8)})]
    if num_tokens <= 16:
        p = split(128, 4)
        return [KernelConfig(128, 16, s, 4, st) for st in (2, 4) for s in sorted({p, min(16, 2 * p)})]
    if num_tokens <= MAX_SPLIT_TOKENS:
        bm = 32 if num_tokens <= 32 else 64
        out = []
        for bn in (64, 128):
            p = split(bn, 4)
            out += [KernelConfig(bn, bm, s, 4, 3) for s in sorted({max(1, p // 2), p})]
        return out
    return [KernelConfig(128, 128, 1, 8, 3), KernelConfig(128, 64, 1, 4, 3)]


def max_split_elements(num_tokens: int, n: int, sms: int) -> int:
    """fp32 workspace elements the candidates at ``num_tokens`` need (0: no split)."""
    return max((c.split_k * num_tokens * n for c in triton_candidates(num_tokens, n, sms)
                if c.split_k > 1), default=0)


def candidates(layer: PackedLinear, num_tokens: int, sms: int) -> list[Path]:
    paths: list[Path] = []
    if isinstance(layer.w, mma.MmaWeights):
        if num_tokens <= mma.MAX_TOKENS:
            paths += [Path(PathKind.MMA, split_k=s, block_n=bn, k_warps=kw)
                      for bn, kw in mma.GEOMETRIES
                      for s in mma.split_candidates(num_tokens, layer.w, sms, bn)]
            if num_tokens >= mma.WGMMA_MIN_TOKENS and mma.wgmma_available():
                paths += [Path(PathKind.WGMMA, split_k=s, block_n=bn)
                          for bn in mma.WGMMA_BLOCKS
                          for s in mma.wgmma_split_candidates(num_tokens, layer.w, sms, bn)]
                paths += [Path(PathKind.WGMMA, block_n=bn, stream_k=g)
                          for bn in mma.WGMMA_BLOCKS
                          for g in mma.wgmma_stream_k_candidates(num_tokens, layer.w, sms, bn)]
    else:
        paths += [Path(PathKind.TRITON, c)
                  for c in triton_candidates(num_tokens, layer.out_features, sms)]
    if layer.q4 is not None and num_tokens <= EXLLAMA_MAX_TOKENS:
        paths.append(Path(PathKind.EXLLAMA))
    if layer.dense is not None and num_tokens >= DENSE_MIN_TOKENS:
        paths.append(Path(PathKind.DENSE))
    return paths


def ladder(max_num_tokens: int) -> list[int]:
    sizes = [t for t in LADDER if t < max_num_tokens]
    return [*sizes, max_num_tokens]


def measure_plan(layers: Sequence[PackedLinear], max_num_tokens: int) -> StepPlan:
    """Time every candidate at every ladder size on ``layers`` (one shape) and keep the
    fastest per size."""
    pool = list(layers[:8])
    first = pool[0]
    sms = num_sms()
    x_all = torch.randn((max_num_tokens, first.in_features), dtype=torch.float16,
                        device=first.device)
    entries: list[tuple[int, Path]] = []
    timings = []
    for t in ladder(max_num_tokens):
        x = x_all[:t]
        measured = tuple((path, time_ms(lambda i, path=path, x=x: pool[i % len(pool)].run(path, x)))
                         for path in candidates(first, t, sms))
        entries.append((t, min(measured, key=lambda pm: pm[1])[0]))
        timings.append((t, measured))
    return StepPlan(tuple(entries), tuple(timings))


def time_ms(fn: Callable[[int], object], reps: int = 8) -> float:
    """Time of one call (ms): ``reps`` calls captured in a CUDA graph, its replays timed by
    CUDA events (median of 5). Decode steps run as graph replays, so this is the cost they
    pay; timed eagerly instead, the host's launch overhead (larger for paths of two launches
    and Python glue) would decide between kernels of a few microseconds. Falls back to eager
    timing when a path cannot be captured."""
    for i in range(2):  # warm-up: compiles the kernel, sets up cuBLAS
        fn(i)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(reps):
                fn(i)
        run = graph.replay
    except RuntimeError:
        graph = None

        def run() -> None:
            for i in range(reps):
                fn(i)
    run()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    del graph
    return sorted(times)[2]
