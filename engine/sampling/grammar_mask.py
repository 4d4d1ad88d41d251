"""The constrained-decoding token mask, applied on the logits' device.

A step's constrained rows arrive as ``GrammarMasks``: their row numbers and a callback that
writes their allowed-token bitmasks (one bit per token id, llguidance's packed layout: token
``t`` is bit ``t % 32`` of int32 word ``t // 32``) into a host buffer. The buffer is uploaded in
one copy and unpacked on the device; disallowed tokens become -inf. Rows without a grammar are
not touched, and a step without any constrained row builds nothing at all (the metadata's
``grammar`` is None).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.transfer import to_device


@dataclass(frozen=True)
class GrammarMasks:
    """A step's per-row side input from the grammar state (built with the batch)."""

    rows: tuple[int, ...]  # sampler rows that are constrained, ascending
    # Writes row j's mask (for ``rows[j]``) into a host int32 [len(rows), ceil(V / 32)] tensor.
    fill: Callable[[torch.Tensor], None]


@dataclass(frozen=True)
class DeviceGrammarMask:
    bitmask: torch.Tensor  # [R, ceil(V / 32)] int32 on the logits' device
    rows: torch.Tensor | None  # [R] int64; None when every row of the batch is constrained


def bitmask_words(vocab: int) -> int:
    return (vocab + 31) // 32


def upload_grammar_masks(masks: GrammarMasks, num_rows: int, vocab: int, device: torch.device,
                         rows: torch.Tensor | None) -> DeviceGrammarMask:
    """Fill the host bitmask (the callback runs the grammar engine) and send it to ``device``.
    ``rows``: the constrained rows already on the device, or None when they are all rows."""
    # Pinned from the start (the grammar engine writes straight into it), so the upload
    # helper sends it as it is: torch's caching host allocator makes this no cudaHostAlloc per
    # step, and keeps the buffer until its non-blocking copy is done.
    host = torch.empty((len(masks.rows), bitmask_words(vocab)), dtype=torch.int32,
                       pin_memory=device.type == "cuda")
    masks.fill(host)
    bitmask = to_device(host, device)
    assert rows is not None or len(masks.rows) == num_rows
    return DeviceGrammarMask(bitmask, rows)


def apply_grammar_mask(logits: torch.Tensor, mask: DeviceGrammarMask) -> None:
    """Set every token a row's grammar forbids to -inf, in place. logits: [B, V] float32."""
    vocab = logits.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)  # [32]
    bits = (mask.bitmask.unsqueeze(-1) >> shifts) & 1  # [R, W, 32]
    forbidden = (bits == 0).view(bits.shape[0], -1)[:, :vocab]  # [R, V]
    if mask.rows is None:
        logits.masked_fill_(forbidden, float("-inf"))
        return
    constrained = logits.index_select(0, mask.rows)  # [R, V]
    constrained.masked_fill_(forbidden, float("-inf"))
    logits.index_copy_(0, mask.rows, constrained)
