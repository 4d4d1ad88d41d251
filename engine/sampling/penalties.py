"""Logit bias, suppression and the repetition / presence / frequency penalties.

Each function edits ``logits`` ([B, V] float32, contiguous) in place over the whole batch;
rows that did not ask carry neutral values in the metadata and come out unchanged.
"""

from __future__ import annotations

import torch

from engine.sampling.metadata import SamplingMetadata


def apply_bias_and_suppression(logits: torch.Tensor, meta: SamplingMetadata) -> None:
    """Add each row's logit_bias, then forbid (-inf) its suppressed ids."""
    flat = logits.view(-1)  # [B * V]
    if meta.bias_index is not None and meta.bias_value is not None:
        flat.index_add_(0, meta.bias_index, meta.bias_value)
    if meta.suppress_index is not None:
        flat.index_fill_(0, meta.suppress_index, float("-inf"))


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> None:
    """The repetition penalty (HF/CTRL: over prompt and output tokens, a seen token's positive
    logit is divided by it, a negative one multiplied), then OpenAI's presence and frequency
    penalties over output tokens: logit[j] -= frequency * count[j] + presence * (count[j] > 0).
    """
    if meta.output_index is None:
        return  # no row has any penalty
    counts = output_token_counts(meta)  # [B, V]
    if meta.repetition_penalty is not None:
        penalty = meta.repetition_penalty  # [B, 1]
        seen = counts > 0
        if meta.prompt_index is not None:
            prompt_seen = torch.zeros(logits.numel(), dtype=torch.bool, device=logits.device)
            prompt_seen.index_fill_(0, meta.prompt_index, True)
            seen |= prompt_seen.view_as(logits)
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits.copy_(torch.where(seen, penalised, logits))
    if meta.frequency_penalty is not None:
        logits.sub_(meta.frequency_penalty * counts)
    if meta.presence_penalty is not None:
        logits.sub_(meta.presence_penalty * (counts > 0))


def output_token_counts(meta: SamplingMetadata) -> torch.Tensor:
    """counts[r, j]: how often row r has generated id j, as float32 [B, V].

    One scatter_add over the flattened table; not torch.bincount, which on CUDA reads the
    largest id back to the host to size its output.
    """
    assert meta.output_index is not None
    index = meta.output_index
    counts = torch.zeros(meta.num_rows * meta.vocab_size, dtype=torch.float32,
                         device=index.device)
    counts.scatter_add_(0, index, torch.ones(index.shape, dtype=torch.float32,
                                             device=index.device))
    return counts.view(meta.num_rows, meta.vocab_size)
