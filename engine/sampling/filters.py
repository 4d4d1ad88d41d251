"""Temperature and the truncation filters (top-k, top-p, min-p) for sampled rows.

Each function edits ``logits`` ([B, V] float32) in place, cutting tokens to -inf. Greedy rows
and rows that did not ask carry neutral values and come out unchanged. The most likely token is
never cut, so every row keeps a candidate.
"""

from __future__ import annotations

import torch

from engine.sampling.metadata import SamplingMetadata


def apply_temperature(logits: torch.Tensor, meta: SamplingMetadata) -> None:
    if meta.temperature is not None:
        logits.div_(meta.temperature)  # [B, 1]: greedy rows carry 1


def apply_top_k_top_p(logits: torch.Tensor, meta: SamplingMetadata) -> None:
    """Keep each row's ``top_k`` most likely tokens, then the smallest set of those whose
    probability (renormalised after the top-k cut) reaches ``top_p``.

    One descending sort. It is stable, so among equal logits the lower id ranks first: exactly
    k tokens survive top-k, and which ones does not depend on the other rows of the batch.
    """
    if meta.top_k is None and meta.top_p is None:
        return
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # [B, V] each
    if meta.top_k is not None:
        rank = torch.arange(vocab, device=logits.device).unsqueeze(0)  # [1, V]
        sorted_logits.masked_fill_(rank >= meta.top_k, float("-inf"))
    if meta.top_p is not None:
        probs = sorted_logits.softmax(dim=-1)  # [B, V]
        # A token is kept while the mass ranked strictly above it is still below p. The top
        # token has exactly 0 above it and p > 0, so it always stays; rows without top-p
        # carry p = +inf and keep everything.
        mass_before = probs.cumsum(dim=-1) - probs
        sorted_logits.masked_fill_(mass_before >= meta.top_p, float("-inf"))
    logits.scatter_(1, order, sorted_logits)  # back to id order


def apply_min_p(logits: torch.Tensor, meta: SamplingMetadata) -> None:
    """Cut tokens whose probability is below ``min_p`` times the row's top probability.

    p_j < min_p * p_max  <=>  logit_j < logit_max + log(min_p): no softmax needed, and rows
    without min-p carry log(min_p) = -inf, a threshold nothing falls below.
    """
    if meta.log_min_p is None:
        return
    threshold = logits.amax(dim=-1, keepdim=True) + meta.log_min_p  # [B, 1]
    logits.masked_fill_(logits < threshold, float("-inf"))
