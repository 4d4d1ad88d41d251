"""Logprobs of sampled tokens and their top alternatives.

Computed from the model's raw logits (before bias, penalties and temperature), as vLLM does by
default and as OpenAI reports them: the distribution the model predicted, not the one the
sampler drew from. A constrained row's grammar mask is the one exception: it is applied first,
as vLLM applies it before its sampler, so such a row's logprobs are of the model's distribution
renormalised over the tokens the grammar allows (the chosen token always has a finite logprob,
and the alternatives listed are allowed ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.outputs import TokenLogprob


@dataclass(frozen=True)
class PendingLogprobs:
    """Logprob tensors still on the device; ``resolve`` reads their host copies.

    Split from the computation so every device op of a step is queued before its one wait.
    """

    num_logprobs: tuple[int | None, ...]  # per row; None where the row asked for none
    chosen: torch.Tensor  # [B] logprob of each row's sampled token
    top_values: torch.Tensor  # [B, K] best logprobs, K = the largest k asked for
    top_ids: torch.Tensor  # [B, K]

    def tensors(self) -> list[torch.Tensor]:
        """What ``resolve`` reads, to fetch to the host with the step's other results."""
        return [self.chosen, self.top_values, self.top_ids]

    def resolve(self, token_ids: Sequence[int],
                host: Sequence[torch.Tensor]) -> list[TokenLogprob | None]:
        """``host``: the host copies of ``tensors()``, in that order."""
        chosen = host[0].tolist()
        top_values = host[1].tolist()
        top_ids = host[2].tolist()
        result: list[TokenLogprob | None] = []
        for row, k in enumerate(self.num_logprobs):
            if k is None:
                result.append(None)
                continue
            # A constrained row may allow fewer than k tokens: the rest are -inf, not listed.
            top = tuple((t, v) for t, v in zip(top_ids[row][:k], top_values[row][:k],
                                               strict=True) if v != float("-inf"))
            result.append(TokenLogprob(token_ids[row], chosen[row], top))
        return result


def log_softmax_if_asked(raw_logits: torch.Tensor,
                         num_logprobs: tuple[int | None, ...]) -> torch.Tensor | None:
    """raw_logits: [B, V] float32 (the vocabulary's columns only) -> [B, V] logprobs, or None
    when no row asked. Taken before the sampler edits its logits in place. Rows are computed
    together (log_softmax of a [B, V] block costs about what one row does on a GPU) and the
    rows that did not ask are dropped on the host."""
    if all(k is None for k in num_logprobs):
        return None
    return raw_logits.log_softmax(dim=-1)


def compute_logprobs(logprobs: torch.Tensor | None, token_ids: torch.Tensor,
                     num_logprobs: tuple[int | None, ...]) -> PendingLogprobs | None:
    """logprobs: [B, V] from ``log_softmax_if_asked``, token_ids: [B] chosen ids."""
    ks = [k for k in num_logprobs if k is not None]
    if logprobs is None or not ks:
        return None
    chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)  # [B]
    top_values, top_ids = logprobs.topk(max(ks), dim=-1)  # [B, K] each; K may be 0
    return PendingLogprobs(num_logprobs, chosen, top_values, top_ids)
