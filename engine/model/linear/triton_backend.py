"""The ``triton`` linear backend: GPTQ weights stay packed on the card, and each layer picks, per
step size, the fastest of the kernels that read its one resident copy:

- with ``use_mma`` (the default on CUDA, ``--linear-backend auto`` or ``mma``), 4-bit layers
  where the w4a16 tensor-core kernel builds: that kernel, in its own fragment-ordered layout
  (``MmaLinear``);
- otherwise (``--linear-backend triton``, 8-bit layers, or no nvcc): the Triton kernels of ``gptq_triton.py`` (a one-token
  GEMV and tensor-core products) and exllamav2's 4-bit kernel (``gemm_half_q_half``), both
  reading the layout exllamav2 rewrites its buffers into (``TritonLinear``);
- either way, dequantise into one shared scratch matrix, then cuBLAS (large prefill steps), or
  a kept dense fp16 copy when ``dense_weights`` asks for it (memory: 4x a 4-bit layer, 2x an
  8-bit one).

Which path serves which step size is measured on the card in ``post_init`` per layer shape
(``plan.measure_plan``), for the step sizes the engine will meet.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch

from engine.checkpoint.types import GPTQLinearWeights
from engine.model.linear import exllama, mma
from engine.model.linear.base import QuantLinear
from engine.model.linear.fp16 import ExpandedLinear, ExpandedLinearBackend
from engine.model.linear.gptq_triton import (
    SplitKWorkspace,
    TritonGPTQWeights,
    dequantize_into,
    gemm_columns,
    gptq_matmul,
    kernel_input,
    pack_for_triton,
    unsupported_reason,
)
from engine.model.linear.plan import (
    MAX_SPLIT_TOKENS,
    Path,
    PathKind,
    StepPlan,
    default_config,
    ladder,
    max_split_elements,
    measure_plan,
    num_sms,
    plan_signature,
)

log = logging.getLogger(__name__)


class TritonLinear:
    """One GPTQ layer; ``plan`` (set by the backend's post_init) picks its path per step."""

    def __init__(self, weights: GPTQLinearWeights, device: torch.device,
                 ext: exllama.ExllamaExt | None) -> None:
        self.name = weights.name
        self.in_features = weights.in_features
        self.out_features = weights.out_features
        self.q4: exllama.ExllamaLinear | None = None
        if ext is not None and exllama.unsupported_reason(weights) is None:
            # exllamav2 sorts and shuffles its own copy in place into the layout the Triton
            # kernels read too; hand them those buffers instead of making a second copy.
            self.q4 = exllama.ExllamaLinear(weights, device, ext)
            perm = None if self.q4.q_perm is None else self.q4.q_perm.to(torch.int32)
            self.w = TritonGPTQWeights(
                qweight=self.q4.qweight, scales=self.q4.scales, qzeros=self.q4.qzeros,
                perm=perm, bias=self.q4.bias, bits=weights.bits,
                group_size=weights.group_size or weights.in_features,
                in_features=weights.in_features, out_features=weights.out_features)
        else:
            self.w = pack_for_triton(weights, device)
        self.perm_long = None if self.w.perm is None else self.w.perm.long()
        self.gemm_cols = gemm_columns(self.w)  # int64 [in]
        self.plan = StepPlan.single(Path(PathKind.TRITON))
        self.workspace: SplitKWorkspace | None = None
        self.dense: torch.Tensor | None = None  # [in, out] fp16: kept copy or scratch view
        self.dense_owned = False

    @property
    def nbytes(self) -> int:
        own = self.w.nbytes
        if self.q4 is not None and self.q4.q_invperm is not None:
            own += self.q4.q_perm.numel() * 2 + self.q4.q_invperm.numel() * 2
        if self.dense_owned and self.dense is not None:
            own += self.dense.numel() * 2
        return own

    def run(self, path: Path, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in] fp16 -> [T, out] fp16 through one given path."""
        if path.kind is PathKind.EXLLAMA:
            assert self.q4 is not None
            return self.q4.forward_q4(x)
        if path.kind is PathKind.DENSE:
            dense = self.dense
            assert dense is not None
            if not self.dense_owned:
                dequantize_into(self.w, dense)
            xin = x if self.perm_long is None else x.index_select(1, self.perm_long)
            out = torch.mm(xin, dense)
            return out if self.w.bias is None else out + self.w.bias
        # The activations are gathered into the kernel's column order first (one small
        # kernel): measured faster than gathering them inside the kernel at every step size.
        config = path.config or default_config(x.shape[0])
        xin = kernel_input(x, self.w, self.gemm_cols, config.block_m == 1)
        # Before the plan is measured the default configuration needs no workspace.
        return gptq_matmul(xin, self.w, config, self.workspace if path.config else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, in] fp16 -> [T, out] fp16. T is a host int: choosing needs no sync."""
        return self.run(self.plan.pick(x.shape[0]), x)

    @property
    def device(self) -> torch.device:
        return self.w.qweight.device

    def signature(self) -> tuple:
        """Layers with the same signature get the same plan."""
        w = self.w
        return ("triton", w.in_features, w.out_features, w.bits, w.group_size,
                w.perm is not None, self.q4 is not None, self.dense_owned)

    def dequantize(self, out: torch.Tensor) -> torch.Tensor:
        return dequantize_into(self.w, out)

    def free(self) -> None:
        if self.q4 is not None:
            self.q4.free()


class MmaLinear:
    """One 4-bit layer on the w4a16 tensor-core kernel; ``plan`` picks MMA, WGMMA or DENSE per
    step."""

    q4 = None  # exllamav2 does not read this layout

    def __init__(self, weights: GPTQLinearWeights, device: torch.device) -> None:
        self.name = weights.name
        self.in_features = weights.in_features
        self.out_features = weights.out_features
        self.w = mma.repack(weights, device)
        self.plan = StepPlan.single(Path(PathKind.MMA))
        self.workspace: SplitKWorkspace | None = None
        self.dense: torch.Tensor | None = None
        self.dense_owned = False

    @property
    def nbytes(self) -> int:
        own = self.w.nbytes
        if self.dense_owned and self.dense is not None:
            own += self.dense.numel() * 2
        return own

    @property
    def device(self) -> torch.device:
        return self.w.qweight.device

    def signature(self) -> tuple:
        w = self.w
        return ("mma", w.in_features, w.out_features, w.group_size, w.perm is not None,
                self.dense_owned)

    def dequantize(self, out: torch.Tensor) -> torch.Tensor:
        return mma.dequantize_into(self.w, out)

    def run(self, path: Path, x: torch.Tensor) -> torch.Tensor:
        if path.kind is PathKind.DENSE:
            dense = self.dense
            assert dense is not None
            if not self.dense_owned:
                mma.dequantize_into(self.w, dense)
            out = torch.mm(mma.sorted_input(x, self.w), dense)
            return out if self.w.bias is None else out + self.w.bias
        if path.kind is PathKind.WGMMA:
            return mma.matmul_wgmma(x, self.w, path.split_k, path.block_n, self.workspace,
                                    path.stream_k)
        assert path.kind is PathKind.MMA
        return mma.matmul(x, self.w, path.split_k, path.block_n, self.workspace, path.k_warps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(self.plan.pick(x.shape[0]), x)

    def free(self) -> None:
        pass


PackedLinear = TritonLinear | MmaLinear


class TritonLinearBackend:
    """4- and 8-bit GPTQ on the Triton kernels, with exllamav2's kernel where it is faster.

    ``dense_weights``: keep a dense fp16 copy of every layer for the large steps (faster
    prefill, 4x a 4-bit layer's memory); otherwise large steps dequantise into one shared
    scratch matrix.
    """

    # forward returns a fresh [T, out] tensor on every path: a LoRA delta may be added to it
    # in place.
    supports_lora = True

    def __init__(self, device: torch.device, dense_weights: bool = False,
                 use_exllama: bool = True, use_mma: bool = False) -> None:
        self.device = device
        self.dense_weights = dense_weights
        # ``mma``: 4-bit layers on the tensor-core kernel where it builds (the default; faster than
        # the Triton and exllamav2 kernels at every batch size measured, docs/benchmarks.md).
        self.use_mma = use_mma and mma.available()
        # exllamav2's kernel only serves 4-bit layers, which the tensor-core kernel takes.
        self.ext = _try_exllama() if use_exllama and not self.use_mma else None
        self.layers: list[PackedLinear] = []
        self._fallback = ExpandedLinearBackend(torch.float16, device)
        self.plans: dict[tuple, StepPlan] = {}
        self.workspace: SplitKWorkspace | None = None
        self.scratch: torch.Tensor | None = None

    @property
    def name(self) -> str:
        """ "triton" plus "+mma" when layers run the tensor-core kernel and "+exllama" when
        layers can take exllamav2's."""
        name = "triton"
        if any(isinstance(layer, MmaLinear) for layer in self.layers):
            name += "+mma"
        if any(layer.q4 is not None for layer in self.layers):
            name += "+exllama"
        return name

    def make(self, weights: GPTQLinearWeights) -> QuantLinear:
        reason = unsupported_reason(weights)
        if reason is not None:
            log.warning("%s: the Triton kernels cannot take %s; expanding it to fp16",
                        weights.name, reason)
            expanded: ExpandedLinear = self._fallback.make(weights)
            return expanded
        layer: PackedLinear
        if self.use_mma and mma.unsupported_reason(weights) is None:
            layer = MmaLinear(weights, self.device)
        else:
            layer = TritonLinear(weights, self.device, self.ext)
        self.layers.append(layer)
        return layer

    def post_init(self, max_num_tokens: int) -> None:
        """Measure each layer shape's plan, then size the split-K workspace and the dense
        storage the plans use."""
        if not self.layers:
            return
        groups: dict[tuple, list[PackedLinear]] = defaultdict(list)
        for layer in self.layers:
            groups[plan_signature(layer)].append(layer)
        # Measuring needs the workspace and scratch at their largest: allocate, measure, trim.
        self.workspace = SplitKWorkspace(*_workspace_bounds(groups, max_num_tokens),
                                         self.device)
        self._allocate_dense(groups, keep=self.dense_weights)
        for sig, layers in groups.items():
            for layer in layers:
                layer.workspace = self.workspace
            plan = measure_plan(layers, max_num_tokens)
            self.plans[sig] = plan
            for layer in layers:
                layer.plan = plan
            log.info("linear %dx%d %s%s: %s", layers[0].in_features, layers[0].out_features,
                     "4-bit mma" if isinstance(layers[0], MmaLinear) else
                     f"{layers[0].w.bits}-bit", " act-order" if layers[0].w.perm is not None
                     else "", plan.describe())
            log.debug("linear %dx%d measured: %s", layers[0].in_features,
                      layers[0].out_features, plan.describe_timings())
        if not any(p.uses(PathKind.DENSE) for p in self.plans.values()):
            self._drop_dense()
        total = sum(layer.nbytes for layer in self.layers)
        log.info("linear weights on the card: %.2f GiB in %d layers (%s)", total / 2**30,
                 len(self.layers), "dense copies kept" if self.dense_weights else "packed")

    def _allocate_dense(self, groups: dict[tuple, list[PackedLinear]], keep: bool) -> None:
        if keep:
            for layers in groups.values():
                for layer in layers:
                    layer.dense = layer.dequantize(torch.empty(
                        (layer.in_features, layer.out_features), dtype=torch.float16,
                        device=self.device))
                    layer.dense_owned = True
            return
        size = max(layer.in_features * layer.out_features for layer in self.layers)
        self.scratch = torch.empty(size, dtype=torch.float16, device=self.device)
        for layer in self.layers:
            layer.dense = self.scratch[:layer.in_features * layer.out_features].view(
                layer.in_features, layer.out_features)
            layer.dense_owned = False

    def _drop_dense(self) -> None:
        for layer in self.layers:
            layer.dense = None
            layer.dense_owned = False
        self.scratch = None


def _workspace_bounds(groups: dict[tuple, list[PackedLinear]],
                      max_num_tokens: int) -> tuple[int, int]:
    """(fp32 partial elements, counters) the largest split launch of any candidate needs."""
    sms = num_sms()
    elements = tiles = 1
    for layers in groups.values():
        n = layers[0].out_features
        if isinstance(layers[0], MmaLinear):
            for t in ladder(min(max_num_tokens, mma.MAX_TOKENS)):
                elements = max(elements, mma.max_partials(t, layers[0].w, sms))
            tiles = max(tiles, mma.max_counters(n))
            continue
        for t in ladder(min(max_num_tokens, MAX_SPLIT_TOKENS)):
            elements = max(elements, max_split_elements(t, n, sms))
        tiles = max(tiles, -(-n // 64) * 4)  # the smallest tile is 64 outputs x 16 tokens
    return elements, tiles


def _try_exllama() -> exllama.ExllamaExt | None:
    try:
        return exllama.load_exllama_ext()
    except Exception as e:  # the backend works without it: the Triton kernels cover 4 bits
        log.info("exllamav2's kernel is not available (%s); Triton kernels only", e)
        return None
