"""Logprobs of sampled tokens and their top alternatives.

Computed from the model's raw logits (before bias, penalties and temperature), as vLLM does by
default and as OpenAI reports them: the distribution the model predicted, not the one the
sampler drew from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.outputs import TokenLogprob


@dataclass(frozen=True)
class PendingLogprobs:
    """Logprob tensors still on the device; ``resolve`` copies them to the host.

    Split from the computation so the sampler queues every device op before its one wait.
    """

    num_logprobs: tuple[int | None, ...]  # per row; None where the row asked for none
    chosen: torch.Tensor  # [B] logprob of each row's sampled token
    top_values: torch.Tensor  # [B, K] best logprobs, K = the largest k asked for
    top_ids: torch.Tensor  # [B, K]

    def resolve(self, token_ids: Sequence[int]) -> list[TokenLogprob | None]:
        chosen = self.chosen.tolist()
        top_values = self.top_values.tolist()
        top_ids = self.top_ids.tolist()
        result: list[TokenLogprob | None] = []
        for row, k in enumerate(self.num_logprobs):
            if k is None:
                result.append(None)
                continue
            top = tuple(zip(top_ids[row][:k], top_values[row][:k], strict=True))
            result.append(TokenLogprob(token_ids[row], chosen[row], top))
        return result


def compute_logprobs(raw_logits: torch.Tensor, token_ids: torch.Tensor,
                     num_logprobs: tuple[int | None, ...]) -> PendingLogprobs | None:
    """raw_logits: [B, V] (the vocabulary's columns only), token_ids: [B] chosen ids.
    None when no row asked. Rows are computed together (log_softmax of a [B, V] block costs
    about what one row does on a GPU) and the rows that did not ask are dropped on the host."""
    ks = [k for k in num_logprobs if k is not None]
    if not ks:
        return None
    logprobs = raw_logits.float().log_softmax(dim=-1)  # [B, V]
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)  # [B]
    top_values, top_ids = logprobs.topk(max(ks), dim=-1)  # [B, K] each; K may be 0
    return PendingLogprobs(num_logprobs, chosen, top_values, top_ids)
