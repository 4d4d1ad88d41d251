"""4-bit GPTQ layers on the w4a16 tensor-core kernel (csrc/w4a16_mma.cuh): the weights
repacked once at load into the MMA fragments' order, the only copy of the layer on the card.

Paths per step (timed at load by ``plan.measure_plan``, like the other packed layers):

- ``MMA``: the tensor-core product on mma.sync, blocks of 128 or 256 outputs
  (``GEOMETRIES``) and 8/16/32/64 tokens, the input dimension split over ``split_k`` blocks
  when the grid is too small to fill the card;
- ``WGMMA``: the same product on Hopper's warpgroup MMA (H100/H200: the module built for
  sm_90a), blocks of 128 or 256 outputs (``WGMMA_BLOCKS``) and 64 or 128 tokens, from
  ``WGMMA_MIN_TOKENS``: at 64-128 tokens mma.sync's throughput bounds the other kernel. Its
  grid is either one block a (tile, K split) or stream-K: one or two persistent blocks a
  multiprocessor, each taking an equal run of (tile, K stage) work (csrc/w4a16_stream_k.h);
- ``DENSE``: dequantise into the shared scratch matrix (or a kept dense copy with
  ``dense_weights``), then cuBLAS: large prefill steps.

A prebuilt module named ``gptq_serve_w4a16_mma`` on the path is imported as is (the container
image builds one ahead of time: Dockerfile, ``python -m engine.model.linear.mma --install``);
otherwise the extension is compiled on first use with torch's JIT builder (nvcc, about a
minute) and cached in ``$GPTQ_KERNEL_CACHE`` (default: torch's extension cache), so restarts
load it. Either way the build targets ``TORCH_CUDA_ARCH_LIST`` (default: the GPU present) with
9.0 compiled as 9.0a (``build_arch_list``): wgmma exists only in sm_90a code, which every
compute-capability-9.0 card runs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path as FsPath
from typing import Any

import torch

from engine.checkpoint.dequant import unpack_cols, unpack_rows
from engine.checkpoint.types import GPTQLinearWeights
from engine.model.linear.gptq_triton import SplitKWorkspace, sort_rows_by_group

log = logging.getLogger(__name__)

CSRC = FsPath(__file__).resolve().parent / "csrc"
EXT_NAME = "gptq_serve_w4a16_mma"
# Tokens a block (the kernel picks the smallest that holds the step); above 64 a step takes
# several blocks, each reading the weights again.
TOKEN_TILES = (8, 16, 32, 64)
# The kernel's block geometries, (output rows a block, warps sharing a tile along K): a warp
# owns rows * k_warps / 8 output rows. Which is fastest depends on the layer and the step
# (more blocks stream more weights at few tokens; wider warps reuse each token fragment), so
# the plan times them all at load; on an H200 each of the four is the best somewhere.
GEOMETRIES = ((128, 1), (256, 1), (128, 2), (256, 2))
STAGE_INPUTS = 128  # inputs a pipeline stage; K splits are whole stages
# Above this the dense path (dequantise, then cuBLAS) is the only candidate; up to it the plan
# times both (the counters are sized for it). A 512-token prefill chunk reads each weight slice
# once for its 8 token blocks (neighbours in launch order), where the dense path writes and
# reads the whole fp16 matrix.
MAX_TOKENS = 512
# Warps a block of the dequantisation kernel (it writes 32 bytes a warp of each output row):
# on an H200 8 wrote 2.8-2.9 TB/s at the 13B shapes, 4 wrote 2.3-2.6, 16 no more than 8.
DEQUANT_WARPS = 8
# The wgmma kernel's block widths (output rows; each warp of its two warpgroups owns rows / 128
# sixteen-row tiles) and the smallest step it is timed at: below 16 tokens its 64-token
# blocks would mostly multiply padding, where the mma.sync kernel is bound by weight reads.
WGMMA_BLOCKS = (128, 256)
WGMMA_MIN_TOKENS = 16

# Position p of a word holds bits 4p..4p+3: the A-fragment value at output row
# g + ROW_OFF[p] and input row 2t + COL_OFF[p] of the 16x16 tile (g = lane / 4, t = lane % 4).
# Bits 4i and 16 + 4i are the low and high halves of fragment register i (the kernel's
# bits 0-3 and 16-19 of ``word >> 4i``); register i covers rows +8 when i is odd, inputs +8 when i >= 2.
ROW_OFF = (0, 8, 0, 8, 0, 8, 0, 8)
COL_OFF = (0, 0, 8, 8, 1, 1, 9, 9)

_ext: Any = None
_ext_error: str | None = None


def sources() -> list[str]:
    """The extension's translation units: the binding and one file a block geometry, which
    ninja compiles in parallel."""
    return [str(CSRC / "w4a16_mma.cu"), *sorted(str(f) for f in CSRC.glob("w4a16_mma_t*.cu")),
            *sorted(str(f) for f in CSRC.glob("w4a16_wgmma_t*.cu"))]


def build_arch_list(arch_list: str | None) -> str | None:
    """The architectures to build for: ``arch_list`` (TORCH_CUDA_ARCH_LIST's syntax; None: the
    GPUs present, as torch picks them) with 9.0 as 9.0a, whose code holds the wgmma kernel.
    A "9.0+PTX" entry keeps its portable PTX beside the 9.0a code."""
    if arch_list is None:
        if not torch.cuda.is_available():
            return None
        caps = sorted({torch.cuda.get_device_capability(i)
                       for i in range(torch.cuda.device_count())})
        arch_list = " ".join(f"{major}.{minor}" for major, minor in caps)
    out: list[str] = []
    for arch in arch_list.replace(";", " ").split():
        if arch == "9.0":
            arch = "9.0a"
        elif arch == "9.0+PTX":
            out.append("9.0a")
        if arch not in out:
            out.append(arch)
    return " ".join(out)


def load_ext() -> Any:
    """The compiled kernels (built and cached on first call); raises when they cannot be."""
    global _ext, _ext_error
    if _ext is not None:
        return _ext
    if _ext_error is not None:
        raise RuntimeError(_ext_error)
    try:
        import importlib

        _ext = importlib.import_module(EXT_NAME)  # prebuilt (the container image)
        return _ext
    except ImportError:
        pass
    try:
        from torch.utils.cpp_extension import load

        build_dir = os.environ.get("GPTQ_KERNEL_CACHE")
        if build_dir:
            FsPath(build_dir).mkdir(parents=True, exist_ok=True)
        given = os.environ.get("TORCH_CUDA_ARCH_LIST")
        arch_list = build_arch_list(given)
        if arch_list is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        try:
            _ext = load(name=EXT_NAME, sources=sources(),
                        extra_include_paths=[str(CSRC)], extra_cflags=["-O3"],
                        extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr"],
                        build_directory=build_dir or None, verbose=False)
        finally:
            if given is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = given
    except Exception as e:  # no nvcc, no GPU: the caller falls back to other kernels
        _ext_error = f"the w4a16 tensor-core kernel could not be built: {e}"
        raise RuntimeError(_ext_error) from e
    return _ext


def available() -> bool:
    try:
        load_ext()
        return True
    except RuntimeError as e:
        log.info("%s; using the Triton and exllamav2 kernels", e)
        return False


def wgmma_available() -> bool:
    """Whether the wgmma kernel runs here: the module holds sm_90a code and the GPU runs it.
    (A prebuilt module from before the wgmma form has no probe: the mma.sync kernel alone.)"""
    try:
        probe = getattr(load_ext(), "wgmma_available", None)
    except RuntimeError:
        return False
    return probe is not None and bool(probe())


def unsupported_reason(weights: GPTQLinearWeights) -> str | None:
    """Why the kernel cannot take this layer, or None when it can."""
    if weights.bits != 4:
        return f"{weights.bits}-bit weights (the kernel is 4-bit)"
    k, n = weights.in_features, weights.out_features
    if k % STAGE_INPUTS or n % 16:
        return (f"shape {k}x{n} (in_features must be a multiple of {STAGE_INPUTS}, "
                "out_features of 16)")
    group = weights.group_size or k
    if k % group or (group != k and (group < 16 or group & (group - 1))):
        return f"group size {group} (must be a power of two >= 16 dividing in_features)"
    if weights.g_idx is not None:
        counts = torch.bincount(weights.g_idx.long().cpu(), minlength=k // group)
        if counts.numel() != k // group or bool((counts != group).any()):
            return "a g_idx whose groups are not all group_size rows"
    return None


@dataclass
class MmaWeights:
    qweight: torch.Tensor  # int32 [out / 16, in / 64, 32, 4]: A fragments (csrc header)
    meta: torch.Tensor  # fp16 [groups, out, 2]: (scale, 1024 + zero + 1)
    perm: torch.Tensor | None  # int64 [in]: input row of sorted position k; None: identity
    bias: torch.Tensor | None  # fp16 [out]
    group_size: int
    in_features: int
    out_features: int

    @property
    def nbytes(self) -> int:
        tensors = [self.qweight, self.meta, self.perm, self.bias]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def fragment_words(q: torch.Tensor) -> torch.Tensor:
    """q: integer [K, N] four-bit values, rows in sorted order -> int32 [N/16, K/64, 32, 4]."""
    k, n = q.shape
    device = q.device
    lane = torch.arange(32, device=device).view(32, 1)
    kk = 2 * (lane % 4) + torch.tensor(COL_OFF, device=device).view(1, 8)  # [32, 8]
    rr = lane // 4 + torch.tensor(ROW_OFF, device=device).view(1, 8)
    # [K/64, 4 words, 16 rows of a word, N/16, 16] -> [N/16, K/64, 4, 16, 16]
    q5 = q.to(torch.int64).view(k // 64, 4, 16, n // 16, 16).permute(3, 0, 1, 2, 4)
    picked = q5[:, :, :, kk, rr]  # [N/16, K/64, 4, 32, 8]
    shifts = torch.arange(0, 32, 4, device=device)
    words = (picked << shifts).sum(-1).permute(0, 1, 3, 2)  # [N/16, K/64, 32, 4]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def repack(weights: GPTQLinearWeights, device: torch.device) -> MmaWeights:
    """The checkpoint's tensors in the kernel's layout (call ``unsupported_reason`` first).
    Peak extra memory is a few times one layer's unpacked matrix."""
    k, n = weights.in_features, weights.out_features
    group = weights.group_size or k
    q = unpack_rows(weights.qweight.to(device=device, dtype=torch.int32), 4)  # [in, out]
    perm = sort_rows_by_group(weights, device)
    perm_long = None if perm is None else perm.long()
    if perm_long is not None:
        q = q[perm_long]
    words = fragment_words(q)
    del q
    scales = weights.scales.to(device=device, dtype=torch.float16)
    zeros = unpack_cols(weights.qzeros.to(device=device, dtype=torch.int32), 4)  # stored - 1
    meta = torch.stack([scales, (zeros + 1025).to(torch.float16)], dim=-1).contiguous()
    return MmaWeights(
        qweight=words, meta=meta, perm=perm_long,
        bias=None if weights.bias is None else weights.bias.to(device=device,
                                                               dtype=torch.float16),
        group_size=group, in_features=k, out_features=n)


def token_tile(num_tokens: int) -> int:
    """The kernel's tokens a block for a step of ``num_tokens``."""
    for tile in TOKEN_TILES:
        if num_tokens <= tile:
            return tile
    return TOKEN_TILES[-1]


def wgmma_token_block(num_tokens: int) -> int:
    """The wgmma kernel's tokens a block for a step of ``num_tokens``."""
    return 64 if num_tokens <= 64 else 128


def split_candidates(num_tokens: int, w: MmaWeights, sms: int, block_n: int,
                     token_block: int = TOKEN_TILES[-1]) -> list[int]:
    """The K splits worth timing for blocks of ``block_n`` outputs and up to ``token_block``
    tokens: from none up to about six blocks a multiprocessor (the most that fit), each split
    keeping >= 2 pipeline stages."""
    stages = w.in_features // STAGE_INPUTS
    blocks = -(-w.out_features // block_n) * -(-num_tokens // token_block)
    out = [1]
    for split in (2, 3, 4, 6, 8, 12, 16):
        if stages // split >= 2 and blocks * split <= 6 * sms:
            out.append(split)
    return out


def wgmma_split_candidates(num_tokens: int, w: MmaWeights, sms: int, block_n: int) -> list[int]:
    return split_candidates(num_tokens, w, sms, block_n, wgmma_token_block(num_tokens))


def stream_k_units(w: MmaWeights, block_n: int) -> int:
    """The (tile block, K stage) units of one token block's work in a stream-K launch."""
    return -(-w.out_features // block_n) * (w.in_features // STAGE_INPUTS)


def wgmma_stream_k_candidates(num_tokens: int, w: MmaWeights, sms: int,
                              block_n: int) -> list[int]:
    """The persistent blocks a token block worth timing for a stream-K wgmma launch: one or
    two a multiprocessor over the token blocks (which of the two fits depends on the
    instantiation's registers and shared memory; the plan measures both), fewer than the
    units so that each block takes a run of them."""
    token_blocks = -(-num_tokens // wgmma_token_block(num_tokens))
    units = stream_k_units(w, block_n)
    return sorted({g for g in (sms // token_blocks, 2 * sms // token_blocks) if 1 <= g < units})


def stream_k_splits(w: MmaWeights, block_n: int, blocks: int) -> int:
    """The most partial sums of one output tile a stream-K launch of ``blocks`` writes: the
    arithmetic of csrc/w4a16_stream_k.h (StreamK::max_splits), for sizing the workspace."""
    units = w.in_features // STAGE_INPUTS
    total = stream_k_units(w, block_n)
    if not 1 <= blocks <= total:
        raise ValueError(f"stream_k must be 1 to {total} blocks for this layer, not {blocks}")
    if total * blocks > 0xFFFFFFFF:  # the kernel's shares are 32-bit arithmetic
        raise ValueError(f"stream_k: {total} units x {blocks} blocks is too many for one launch")

    def owner(u: int) -> int:  # the block whose share holds unit u
        return ((u + 1) * blocks - 1) // total

    return max(owner(tb * units + units - 1) - owner(tb * units) + 1
               for tb in range(total // units))


def max_partials(num_tokens: int, w: MmaWeights, sms: int) -> int:
    """fp32 workspace elements the split launches the plan times at ``num_tokens`` need (0:
    none). A split keeps whole token blocks' partials (csrc TileStore), so the tokens count
    rounded up to the kernel's block: mma.sync's, or from ``WGMMA_MIN_TOKENS`` the wgmma
    form's (a multiple of it)."""
    split = max(max(split_candidates(num_tokens, w, sms, bn)) for bn, _ in GEOMETRIES)
    block = token_tile(num_tokens)
    if num_tokens >= WGMMA_MIN_TOKENS:
        block = wgmma_token_block(num_tokens)
        split = max(split, *(max(wgmma_split_candidates(num_tokens, w, sms, bn))
                             for bn in WGMMA_BLOCKS))
        # (a layer of few stages and tiles may have no stream-K candidate at all)
        split = max([split, *(stream_k_splits(w, bn, g) for bn in WGMMA_BLOCKS
                              for g in wgmma_stream_k_candidates(num_tokens, w, sms, bn))])
    tokens = -(-num_tokens // block) * block
    return split * tokens * w.out_features if split > 1 else 0


def max_counters(n: int) -> int:
    return -(-MAX_TOKENS // TOKEN_TILES[-1]) * (n // 16)


def sorted_input(x: torch.Tensor, w: MmaWeights) -> torch.Tensor:
    """The activations in sorted row order (act-order layers gather their columns), for the
    dense path."""
    return x if w.perm is None else x.index_select(1, w.perm)


def _launch_args(x: torch.Tensor, w: MmaWeights, split_k: int,
                 workspace: SplitKWorkspace | None) -> tuple:
    """The binding's arguments up to split_k, shared by both products (unused tensors stand in
    for the workspace when the launch is not split)."""
    if split_k > 1 and workspace is None:
        raise ValueError(f"split_k={split_k} needs a workspace")
    if x.stride(1) != 1:
        x = x.contiguous()
    ws = workspace.partials if workspace is not None else x
    counters = workspace.counters if workspace is not None else x
    return x, w.perm, w.qweight, w.meta, w.group_size, w.bias, ws, counters, split_k


def matmul(x: torch.Tensor, w: MmaWeights, split_k: int, block_n: int,
           workspace: SplitKWorkspace | None, k_warps: int = 1) -> torch.Tensor:
    """x: [M, in] fp16, columns in checkpoint order -> [M, out] fp16: one launch (act-order
    layers gather their columns into sorted order first). (block_n, k_warps): one of
    ``GEOMETRIES``."""
    if (block_n, k_warps) not in GEOMETRIES:
        raise ValueError(f"no block geometry ({block_n}, {k_warps}); one of {GEOMETRIES}")
    return load_ext().matmul(*_launch_args(x, w, split_k, workspace), block_n, k_warps)


def matmul_wgmma(x: torch.Tensor, w: MmaWeights, split_k: int, block_n: int,
                 workspace: SplitKWorkspace | None, stream_k: int = 0) -> torch.Tensor:
    """As ``matmul``, on the wgmma kernel (only where ``wgmma_available``); ``block_n``: one of
    ``WGMMA_BLOCKS``. ``stream_k``: 0, or a stream-K launch of that many persistent blocks a
    token block (``split_k`` 1; the workspace holds ``stream_k_splits`` partial sums)."""
    if block_n not in WGMMA_BLOCKS:
        raise ValueError(f"no wgmma block of {block_n} rows; one of {WGMMA_BLOCKS}")
    if stream_k and split_k != 1:
        raise ValueError("stream_k replaces split_k: pass split_k=1")
    if stream_k and workspace is None:
        # (the binding checks its size against StreamK::max_splits: not worked out twice a call)
        raise ValueError(f"stream_k={stream_k} needs a workspace")
    return load_ext().matmul_wgmma(*_launch_args(x, w, split_k, workspace), block_n, stream_k)


def dequantize_into(w: MmaWeights, out: torch.Tensor,
                    warps: int = DEQUANT_WARPS) -> torch.Tensor:
    """The dense weight [in, out] fp16, rows in sorted order, written into ``out``; ``warps``
    (4, 8 or 16) a block of the kernel."""
    if out.shape != (w.in_features, w.out_features) or out.dtype != torch.float16 \
            or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous fp16 [{w.in_features}, {w.out_features}]")
    load_ext().dequantize(w.qweight, w.meta, w.group_size, out, warps)
    return out


def install_prebuilt() -> str:
    """Build the extension and copy it into site-packages as an importable module, so a
    machine without nvcc (the runtime image) imports it. Returns the installed path."""
    import shutil
    import sysconfig

    module = load_ext()
    target = FsPath(sysconfig.get_paths()["platlib"]) / FsPath(module.__file__).name
    shutil.copy2(module.__file__, target)
    return str(target)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--install"]:
        sys.exit("usage: python -m engine.model.linear.mma --install")
    print(install_prebuilt())
