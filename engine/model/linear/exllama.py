"""The ``exllama`` linear backend: exllamav2's 4-bit GPTQ kernels, with a dense path for big steps.

exllamav2's ``gemm_half_q_half`` streams the packed 4-bit weights once per 4 token rows: at one
token per step it reads 4x fewer bytes than an fp16 product and wins, but its cost grows with the
token count while cuBLAS on a dense fp16 matrix barely moves. So each layer picks per step:

    T < crossover:  out = gemm_half_q_half(x, q_matrix)            (4-bit kernel)
    T >= crossover: out = x @ W_dense, W_dense = reconstruct(q_matrix)  (cuBLAS)

The crossover is measured on the card at start-up, per layer shape (``measure_crossover``). By
default every layer reconstructs into one shared scratch buffer right before its product, as
exllamav2 itself does above its threshold (``dense="scratch"``); ``dense="keep"`` keeps a dense
fp16 copy per layer instead (4x the packed weights' memory), the opt-in ``dense_weights``
setting. This backend is the ``exllama`` choice; the default on CUDA is ``triton_backend.py``,
which shares its layers' buffers with the Triton kernels.

Set-up has two phases (linear/base.py): ``make()`` builds each q-matrix (exllamav2 shuffles the
packed weights in place and, for act-order, sorts their rows by group, so each layer owns its
copy); ``post_init(max_num_tokens)`` then measures the crossover and sizes the dense storage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from engine.checkpoint.types import GPTQLinearWeights, QuantConfig
from engine.model.linear.base import LinearBackend, QuantLinear
from engine.model.linear.fp16 import ExpandedLinear, ExpandedLinearBackend

log = logging.getLogger(__name__)

# Token counts at which the two paths are timed; the crossover is one of these.
_LADDER = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
_NEVER = 1 << 30


@dataclass(frozen=True)
class ExllamaExt:
    """The compiled exllamav2 extension and its stand-in for a missing tensor argument."""

    c: Any  # the exllamav2_ext module
    none_tensor: torch.Tensor


def load_exllama_ext() -> ExllamaExt:
    """Import exllamav2's extension (built just in time on first use unless a prebuilt
    exllamav2_ext is importable)."""
    try:
        from exllamav2 import ext
    except ImportError as e:
        raise ImportError("the exllama linear backend needs exllamav2 0.3.2 and a CUDA GPU: "
                          "pip install 'gptq-serve[cuda]'") from e
    return ExllamaExt(ext.ext_c, ext.none_tensor)


def unsupported_reason(weights: GPTQLinearWeights) -> str | None:
    """Why exllamav2's GPTQ kernel cannot take this layer, or None when it can."""
    if weights.bits != 4:
        return f"{weights.bits}-bit weights (the kernel is 4-bit only)"
    if weights.in_features % 32 or weights.out_features % 32:
        return f"shape {weights.in_features}x{weights.out_features} (both must be multiples of 32)"
    if weights.in_features > 65535:
        return "more than 65535 input features (16-bit row permutation)"
    group = weights.group_size
    if group is not None and (group < 32 or group & (group - 1) or weights.in_features % group):
        # The kernel derives the group size as the power of two covering in/groups and steps
        # through groups 32 rows at a time.
        return f"group size {group} (must be a power of two >= 32 dividing in_features)"
    if weights.g_idx is not None and group is not None:
        counts = torch.bincount(weights.g_idx.long(), minlength=weights.in_features // group)
        if counts.numel() != weights.in_features // group or bool((counts != group).any()):
            return "a g_idx whose groups are not all group_size rows"
    return None


def _trivial_g_idx(weights: GPTQLinearWeights) -> bool:
    """True when rows are already in group order (no act-order): no permutation needed."""
    if weights.g_idx is None or weights.group_size is None:
        return True
    expected = torch.arange(weights.in_features, dtype=torch.int64) // weights.group_size
    return bool(torch.equal(weights.g_idx.cpu().long(), expected))


class ExllamaLinear:
    """One 4-bit GPTQ layer on exllamav2's q-matrix."""

    def __init__(self, weights: GPTQLinearWeights, device: torch.device, ext: ExllamaExt) -> None:
        self.name = weights.name
        self.in_features = weights.in_features
        self.out_features = weights.out_features
        self._ext = ext
        # The q-matrix keeps raw pointers to these tensors: they live as long as this object.
        self.qweight = weights.qweight.to(device=device, dtype=torch.int32, copy=True)  # [in/8, out]
        self.qzeros = weights.qzeros.to(device=device, dtype=torch.int32).contiguous()  # [G, out/8]
        self.scales = weights.scales.to(device=device, dtype=torch.float16).contiguous()  # [G, out]
        self.bias = (None if weights.bias is None
                     else weights.bias.to(device=device, dtype=torch.float16).contiguous())
        none = ext.none_tensor
        if _trivial_g_idx(weights):
            self.q_perm = self.q_invperm = None
            g_idx_cpu = none
        else:
            # Filled by make_q_matrix: the row order that sorts rows by group, and its inverse.
            self.q_perm = torch.empty(self.in_features, dtype=torch.int16, device=device)
            self.q_invperm = torch.empty_like(self.q_perm)
            assert weights.g_idx is not None
            g_idx_cpu = weights.g_idx.to(device="cpu", dtype=torch.int32).contiguous()
        self.handle: int = ext.c.make_q_matrix(
            self.qweight, _or(self.q_perm, none), _or(self.q_invperm, none),
            none, none, none, none,  # EXL2 fields
            self.qzeros, self.scales, g_idx_cpu, _or(self.bias, none),
            none, 0)  # no temp_dq: the dense path below does its own reconstruction
        # Set by post_init. Until then every step uses the 4-bit kernel.
        self.crossover = _NEVER
        self.dense: torch.Tensor | None = None  # [in, out] fp16, own or a view of the scratch
        self.dense_owned = False

    def reconstruct(self, out: torch.Tensor) -> None:
        """Dequantise the whole matrix into out: [in, out_features] fp16 (row order restored)."""
        self._ext.c.reconstruct(self.handle, out)

    def forward_q4(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in] fp16 -> [T, out] through the 4-bit kernel."""
        out = torch.empty((x.shape[0], self.out_features), dtype=torch.float16, device=x.device)
        self._ext.c.gemm_half_q_half(x.contiguous(), self.handle, out, True)
        return out

    def forward_dense(self, x: torch.Tensor, dense: torch.Tensor, owned: bool) -> torch.Tensor:
        """x: [T, in] -> [T, out] through cuBLAS on the dense matrix ``dense``: [in, out]."""
        if not owned:
            self.reconstruct(dense)
        out = torch.mm(x, dense)
        return out if self.bias is None else out + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in] fp16 -> [T, out] fp16. T is a host int: the branch needs no sync."""
        if x.shape[0] < self.crossover or self.dense is None:
            return self.forward_q4(x)
        return self.forward_dense(x, self.dense, self.dense_owned)

    def free(self) -> None:
        if self.handle:
            self._ext.c.free_q_matrix(self.handle)
            self.handle = 0

    def __del__(self) -> None:
        self.free()


def _or(t: torch.Tensor | None, none: torch.Tensor) -> torch.Tensor:
    return none if t is None else t


class ExllamaLinearBackend:
    """4-bit GPTQ on exllamav2's kernels; layers the kernel cannot take are expanded to fp16.

    ``crossover``: a fixed token count for every layer, or None to measure it per shape.
    ``dense``: "scratch" (one shared buffer, reconstructed per call) or "keep" (a dense fp16
    copy per layer).
    """

    name = "exllama"
    # forward returns a fresh [T, out] tensor: a LoRA delta may be added to it in place.
    supports_lora = True

    def __init__(self, device: torch.device, crossover: int | None = None,
                 dense: str = "scratch", ext: ExllamaExt | None = None) -> None:
        if dense not in ("keep", "scratch"):
            raise ValueError(f"dense must be keep or scratch; got {dense!r}")
        self.device = device
        self.fixed_crossover = crossover
        self.dense_policy = dense
        self.ext = ext or load_exllama_ext()
        self.layers: list[ExllamaLinear] = []
        self._fallback = ExpandedLinearBackend(torch.float16, device)
        self.crossovers: dict[tuple[int, int], Crossover] = {}
        self.scratch: torch.Tensor | None = None  # [max in*out] fp16 when dense == "scratch"
        self.keeps_dense = False

    def make(self, weights: GPTQLinearWeights) -> QuantLinear:
        reason = unsupported_reason(weights)
        if reason is not None:
            log.warning("%s: exllama cannot take %s; expanding it to fp16", weights.name, reason)
            layer: ExpandedLinear = self._fallback.make(weights)
            return layer
        q_layer = ExllamaLinear(weights, self.device, self.ext)
        self.layers.append(q_layer)
        return q_layer

    def post_init(self, max_num_tokens: int) -> None:
        """Measure (or apply) the crossover per shape, then give the layers that will ever take
        the dense path their dense storage."""
        if not self.layers:
            return
        by_shape: dict[tuple[int, int], list[ExllamaLinear]] = {}
        for layer in self.layers:
            by_shape.setdefault((layer.in_features, layer.out_features), []).append(layer)
        self.keeps_dense = self.dense_policy == "keep"
        for shape, layers in by_shape.items():
            if self.fixed_crossover is not None:
                xo = Crossover(shape, self.fixed_crossover, ())
            else:
                xo = measure_crossover(layers, max_num_tokens, keep_dense=self.keeps_dense)
            self.crossovers[shape] = xo
            for layer in layers:
                layer.crossover = xo.tokens
        self._allocate_dense(by_shape, max_num_tokens)
        for shape, xo in self.crossovers.items():
            log.info("exllama %dx%d: 4-bit kernel below %s tokens, dense %s above", shape[0],
                     shape[1], xo.tokens if xo.tokens <= max_num_tokens else "all",
                     "kept" if self.keeps_dense else "reconstructed per call")

    def _allocate_dense(self, by_shape: dict[tuple[int, int], list[ExllamaLinear]],
                        max_num_tokens: int) -> None:
        used = {s: ls for s, ls in by_shape.items() if self.crossovers[s].tokens <= max_num_tokens}
        if not used:
            return
        if self.keeps_dense:
            for (k, n), layers in used.items():
                for layer in layers:
                    layer.dense = torch.empty((k, n), dtype=torch.float16, device=self.device)
                    layer.reconstruct(layer.dense)
                    layer.dense_owned = True
            return
        size = max(k * n for k, n in used)
        self.scratch = torch.empty(size, dtype=torch.float16, device=self.device)
        for (k, n), layers in used.items():
            for layer in layers:
                layer.dense = self.scratch[:k * n].view(k, n)
                layer.dense_owned = False


@dataclass(frozen=True)
class Crossover:
    shape: tuple[int, int]  # (in_features, out_features)
    # Smallest step size (tokens) from which the dense path is used; _NEVER when never.
    tokens: int
    # What was measured: (tokens, 4-bit kernel ms, dense path ms).
    timings: tuple[tuple[int, float, float], ...]


def measure_crossover(layers: list[ExllamaLinear], max_num_tokens: int,
                      keep_dense: bool) -> Crossover:
    """Time both paths at each ladder size up to max_num_tokens on layers of one shape.

    The crossover is the smallest size from which the dense path is faster at every larger
    size measured (one noisy point does not flip it). Successive calls rotate over up to eight
    layers and two dense matrices, so the timings read from device memory rather than from L2,
    as in a real forward pass.
    """
    k, n = layers[0].in_features, layers[0].out_features
    device = layers[0].qweight.device
    sizes = [t for t in _LADDER if t <= max_num_tokens]
    x = torch.randn((sizes[-1], k), dtype=torch.float16, device=device)
    pool = layers[:8]
    denses = [torch.empty((k, n), dtype=torch.float16, device=device) for _ in range(2)]
    for i, dense in enumerate(denses):
        pool[i % len(pool)].reconstruct(dense)
    timings = []
    for t in sizes:
        xt = x[:t]
        q4_ms = _time_ms(lambda i, xt=xt: pool[i % len(pool)].forward_q4(xt))
        dense_ms = _time_ms(lambda i, xt=xt: pool[i % len(pool)].forward_dense(
            xt, denses[i % 2], owned=keep_dense))
        timings.append((t, q4_ms, dense_ms))
    tokens = _NEVER
    for t, q4_ms, dense_ms in reversed(timings):
        if dense_ms >= q4_ms:
            break
        tokens = t
    return Crossover((k, n), tokens, tuple(timings))


def _time_ms(fn: Callable[[int], object], reps: int = 16) -> float:
    """Median over 3 rounds of the mean time of ``reps`` calls, by CUDA events."""
    for i in range(3):
        fn(i)
    rounds = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(reps):
            fn(i)
        end.record()
        end.synchronize()
        rounds.append(start.elapsed_time(end) / reps)
    return sorted(rounds)[1]


def make_cuda_linear_backend(quant: QuantConfig, dtype: torch.dtype, device: torch.device,
                             dense_weights: bool = False) -> LinearBackend:
    """The ``exllama`` choice on a CUDA device: exllama for 4-bit fp16 models, else every layer
    expanded at load (8-bit GPTQ has no exllama kernel)."""
    if quant.bits == 4 and dtype == torch.float16:
        return ExllamaLinearBackend(device, dense="keep" if dense_weights else "scratch")
    log.info("no exllama kernel for %d-bit weights in %s: expanding every layer to %s at load "
             "(linear backend fp16-expanded)", quant.bits, dtype, dtype)
    return ExpandedLinearBackend(dtype, device)
