"""The w4a16 tensor-core kernel's weight layout (engine/model/linear/mma.py), checked on the CPU
against the PTX ISA's fragment layout of mma.m16n8k16 (the kernel itself runs in
tests/test_cuda_mma.py): decoding each lane's four A registers the way the kernel does, then
placing them where the ISA says a lane's registers sit, must give back the transposed weights
and the reference dequantisation."""

from __future__ import annotations

import pytest
import torch

from engine.bench.layers import random_gptq_layer
from engine.model.linear import mma


def decode_like_the_kernel(words: torch.Tensor, meta: torch.Tensor, group: int, k: int,
                           n: int) -> torch.Tensor:
    """-> fp32 [K, N]: each lane's registers reg_i = ((word >> 4i) & 0x000F000F) | 0x64006400,
    (reg - zero') * scale, placed per the ISA: register i of lane (g = lane / 4, t = lane % 4)
    holds A[g + 8 (i & 1)][2t + 8 (i >> 1) + h], h = 0 (low half) or 1 (high half)."""
    out = torch.full((k, n), float("nan"))
    w = words.to(torch.int64) & 0xFFFFFFFF
    for tile in range(n // 16):
        for c in range(k // 64):
            for lane in range(32):
                g, t = lane // 4, lane % 4
                for s in range(4):
                    word = int(w[tile, c, lane, s])
                    k0 = 64 * c + 16 * s
                    for i in range(4):
                        for h in range(2):
                            q = (word >> (4 * i + 16 * h)) & 0xF
                            row = tile * 16 + g + 8 * (i & 1)
                            kk = k0 + 2 * t + 8 * (i >> 1) + h
                            scale, zero = meta[kk // group, row].tolist()
                            v = torch.tensor(1024.0 + q).half()
                            out[kk, row] = ((v - torch.tensor(zero).half()) *
                                            torch.tensor(scale).half()).float()
    return out


def test_fragment_layout_matches_the_isa_and_the_reference() -> None:
    gen = torch.Generator().manual_seed(3)
    for group, act_order in ((32, True), (64, False), (None, False)):
        k, n = 128, 32
        weights, ref = random_gptq_layer(k, n, 4, group, act_order, gen, device="cpu")
        assert mma.unsupported_reason(weights) is None
        w = mma.repack(weights, torch.device("cpu"))
        assert w.qweight.shape == (n // 16, k // 64, 32, 4)
        got = decode_like_the_kernel(w.qweight, w.meta.float(), w.group_size, k, n)
        want = ref.t()  # [in, out], rows in checkpoint order
        if w.perm is not None:
            want = want[w.perm]  # the kernel's rows are in sorted order
        # The fp16 dequantisation is the reference's: exact up to one rounding by the scale.
        torch.testing.assert_close(got, want.half().float(), rtol=0, atol=0)


def test_layout_is_no_bigger_than_the_checkpoint_allows() -> None:
    gen = torch.Generator().manual_seed(4)
    for group in (32, 128):
        weights, _ = random_gptq_layer(512, 256, 4, group, True, gen, device="cpu")
        w = mma.repack(weights, torch.device("cpu"))
        ckpt = sum(t.numel() * t.element_size()
                   for t in (weights.qweight, weights.qzeros, weights.scales, weights.g_idx))
        assert w.nbytes <= 1.15 * ckpt


def test_unsupported_layers_say_why() -> None:
    gen = torch.Generator().manual_seed(5)
    eight, _ = random_gptq_layer(128, 32, 8, 32, False, gen, device="cpu")
    assert "8-bit" in (mma.unsupported_reason(eight) or "")
    odd, _ = random_gptq_layer(96, 32, 4, 32, False, gen, device="cpu")
    assert "multiple of 128" in (mma.unsupported_reason(odd) or "")


def test_token_tiles_and_splits() -> None:
    assert [mma.token_tile(t) for t in (1, 8, 9, 16, 17, 33, 64, 200)] == \
        [8, 8, 16, 16, 32, 64, 64, 64]
    gen = torch.Generator().manual_seed(6)
    weights, _ = random_gptq_layer(1024, 64, 4, 128, False, gen, device="cpu")
    w = mma.repack(weights, torch.device("cpu"))
    for bn in {bn for bn, _ in mma.GEOMETRIES}:
        splits = mma.split_candidates(1, w, sms=132, block_n=bn)
        # Every split keeps two pipeline stages of the 8 in K = 1024.
        assert splits == [1, 2, 3, 4], splits
    # A split keeps whole token blocks' partials: one token is a block of 8.
    assert mma.max_partials(1, w, 132) == 4 * 8 * 64
    # A grid that already fills the card is not split further than ~6 blocks a multiprocessor.
    big, _ = random_gptq_layer(5120, 2048, 4, 128, False, gen, device="cpu")
    wb = mma.repack(big, torch.device("cpu"))
    assert max(mma.split_candidates(1, wb, sms=8, block_n=128)) <= 6 * 8 // (2048 // 128)


def test_wgmma_token_blocks_and_splits() -> None:
    assert [mma.wgmma_token_block(t) for t in (16, 64, 65, 128, 512)] == [64, 64, 128, 128, 128]
    gen = torch.Generator().manual_seed(8)
    weights, _ = random_gptq_layer(5120, 5120, 4, 128, False, gen, device="cpu")
    w = mma.repack(weights, torch.device("cpu"))
    # 128-token blocks: a 512-token step is 4 blocks along M, not 8, so splits stay allowed
    # longer, and the workspace is sized for the larger of the two kernels' splits.
    for t in (64, 100, 128, 200, 512):
        block = mma.wgmma_token_block(t)
        for bn in mma.WGMMA_BLOCKS:
            wg = mma.wgmma_split_candidates(t, w, 132, bn)
            assert wg[0] == 1 and set(mma.split_candidates(t, w, 132, bn)) <= set(wg)
            # whole blocks of 128 tokens: 100 tokens need the partials of 128
            assert mma.max_partials(t, w, 132) >= max(wg) * -(-t // block) * block * 5120 \
                or max(wg) == 1


def _stream_k_runs(units: int, total: int, blocks: int) -> list[tuple[int, int, int, int, int]]:
    """Every block's runs (block, tile block, first stage, stages, split), walked as the
    kernel walks its share (csrc/w4a16_stream_k.h), the owner found by search, not by its
    closed form."""
    first = [b * total // blocks for b in range(blocks + 1)]
    runs = []
    for b in range(blocks):
        u = first[b]
        while u < first[b + 1]:
            tb, k0 = divmod(u, units)
            n = min(units - k0, first[b + 1] - u)
            lo = max(c for c in range(blocks) if first[c] <= tb * units)
            runs.append((b, tb, k0, n, b - lo))
            u += n
    return runs


def test_stream_k_covers_every_stage_once_in_k_order() -> None:
    """A stream-K launch's blocks cover each (tile block, K stage) unit exactly once, a tile
    block's splits are numbered 0.. in K order, and the workspace is sized for the most
    splits any tile block has."""
    gen = torch.Generator().manual_seed(9)
    for k, n in ((5120, 27648), (13824, 5120), (5120, 1024)):
        weights, _ = random_gptq_layer(k, n, 4, 128, False, gen, device="cpu")
        w = mma.repack(weights, torch.device("cpu"))
        units = k // mma.STAGE_INPUTS
        for bn in mma.WGMMA_BLOCKS:
            total = mma.stream_k_units(w, bn)
            assert total == -(-n // bn) * units
            # At most one block a unit: a launch never has a block with an empty share.
            for blocks in {b for b in (1, 7, 131, 132, 264, total // 12, total - 1) if 1 <= b <= total}:
                runs = _stream_k_runs(units, total, blocks)
                covered = sorted((tb, k0 + i) for _, tb, k0, c, _ in runs for i in range(c))
                assert covered == [(tb, s) for tb in range(total // units) for s in range(units)]
                splits: dict[int, list[tuple[int, int]]] = {}
                for _, tb, k0, _, split in runs:
                    splits.setdefault(tb, []).append((k0, split))
                for parts in splits.values():
                    assert [s for _, s in sorted(parts)] == list(range(len(parts)))
                assert mma.stream_k_splits(w, bn, blocks) == max(map(len, splits.values()))
            for t in (16, 64, 100, 128, 512):
                padded = -(-t // mma.wgmma_token_block(t)) * mma.wgmma_token_block(t)
                for g in mma.wgmma_stream_k_candidates(t, w, 132, bn):
                    assert 1 <= g < total
                    assert mma.max_partials(t, w, 132) >= mma.stream_k_splits(w, bn, g) * \
                        padded * n or mma.stream_k_splits(w, bn, g) == 1
        with pytest.raises(ValueError):
            mma.stream_k_splits(w, 128, mma.stream_k_units(w, 128) + 1)
        # Checked before any launch (no GPU needed): a stream-K launch sums partials.
        x = torch.zeros((64, k), dtype=torch.float16)
        with pytest.raises(ValueError, match="needs a workspace"):
            mma.matmul_wgmma(x, w, 1, 256, None, stream_k=132)
        with pytest.raises(ValueError, match="replaces split_k"):
            mma.matmul_wgmma(x, w, 2, 256, None, stream_k=132)


def test_workspace_bound_of_a_layer_too_small_for_stream_k() -> None:
    """A small model's layer (one tile block, a few stages) has no stream-K candidate on a
    132-multiprocessor card: its workspace bound is the K splits' alone (once a TypeError at
    load, on every small checkpoint on an H100/H200)."""
    gen = torch.Generator().manual_seed(3)
    weights, _ = random_gptq_layer(1024, 128, 4, 128, False, gen, device="cpu")
    w = mma.repack(weights, torch.device("cpu"))
    assert max(mma.wgmma_split_candidates(64, w, 132, 128)) > 1  # K splits, no stream-K
    for t in (16, 64, 128, 256, 512):
        assert all(not mma.wgmma_stream_k_candidates(t, w, 132, bn) for bn in mma.WGMMA_BLOCKS)
        bound = mma.max_partials(t, w, 132)
        block = mma.wgmma_token_block(t)
        for bn in mma.WGMMA_BLOCKS:  # every K-split launch the plan times still fits
            for split in mma.wgmma_split_candidates(t, w, 132, bn):
                assert split == 1 or bound >= split * -(-t // block) * block * 128


def test_build_targets_hopper_as_sm90a() -> None:
    """wgmma exists only in sm_90a code: a 9.0 target is built as 9.0a, and a 9.0+PTX one
    keeps its portable PTX beside it; other targets are left as given."""
    assert mma.build_arch_list("8.0 8.6 8.9 9.0") == "8.0 8.6 8.9 9.0a"
    assert mma.build_arch_list("8.0;9.0") == "8.0 9.0a"
    assert mma.build_arch_list("9.0+PTX") == "9.0a 9.0+PTX"
    assert mma.build_arch_list("9.0a 9.0") == "9.0a"
    assert mma.build_arch_list("8.9 10.0") == "8.9 10.0"
    if not torch.cuda.is_available():
        assert mma.build_arch_list(None) is None  # torch's own default applies


def test_wgmma_is_offered_only_where_the_module_says_it_runs(monkeypatch) -> None:
    """The plan offers the wgmma form only on the module's word: a module whose probe says
    no, or a prebuilt one from before the form (no probe at all), gives mma.sync alone."""
    import types

    for module, expected in ((types.SimpleNamespace(wgmma_available=lambda: True), True),
                             (types.SimpleNamespace(wgmma_available=lambda: False), False),
                             (types.SimpleNamespace(), False)):
        monkeypatch.setattr(mma, "_ext", module)
        assert mma.wgmma_available() is expected
    monkeypatch.setattr(mma, "_ext", None)
    monkeypatch.setattr(mma, "_ext_error", "no nvcc")
    assert mma.wgmma_available() is False


def test_kernel_sources_ship_with_the_package() -> None:
    """The kernel compiles from its sources at first use: a wheel without them could not."""
    import fnmatch
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    declared = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["engine.model.linear"]
    sources = [p.relative_to(mma.CSRC.parent).as_posix() for p in mma.CSRC.iterdir()]
    assert sources and all(any(fnmatch.fnmatch(s, pat) for pat in declared) for s in sources)


def test_mma_is_a_linear_backend_choice_that_needs_a_gpu() -> None:
    import pytest

    from engine.checkpoint.types import QuantConfig
    from engine.config import ConfigError, EngineConfig
    from engine.core.build import make_linear_backend

    config = EngineConfig(linear_backend="mma")  # validated on construction
    quant = QuantConfig(bits=4, group_size=128, desc_act=False, sym=True)
    with pytest.raises(ConfigError, match="CUDA"):
        make_linear_backend(config, quant, torch.device("cpu"), torch.float32)
    with pytest.raises(ConfigError, match="linear_backend"):
        EngineConfig(linear_backend="marlin")
