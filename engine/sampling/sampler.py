"""Batched per-request sampling on the logits' device.

One call picks the next token of every row of a step. The order follows vLLM:

0. the grammar mask of constrained rows (-inf on tokens their grammar forbids; only when a row
   of the step has a grammar, see ``grammar_mask.py``);
1. logit_bias, then suppression (-inf on ids forbidden this step);
2. repetition penalty (prompt and output tokens), then presence / frequency penalties (output);
3. greedy rows take the argmax; the others are divided by their temperature, cut by top-k,
   top-p and min-p, and sampled.

Logprobs come from the raw logits, after the grammar mask (see ``logprobs.py``). Per-row
parameters become [B] tensors once per call, uploaded in one copy per dtype (``metadata.py``);
nothing loops over the vocabulary in Python, and ``sample`` never waits for the device: the
chosen ids stay there (the next step reads them as its input) until the caller fetches them
with the step's other results.

Seeded rows: the same seed gives the same tokens whatever else is in the batch. Sampling is an
exponential race, ``argmax(p / E)`` with ``E ~ Exp(1)`` i.i.d. per token, which picks token j
with probability p_j. Each seeded row draws its own [V] noise from its own generator, one draw
per sampled step, and every stage works row by row, so neither the batch's size nor its other
rows change what that row draws or keeps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from engine.outputs import TokenLogprob
from engine.params import SamplingParams
from engine.sampling.filters import apply_min_p, apply_temperature, apply_top_k_top_p
from engine.sampling.grammar_mask import GrammarMasks, apply_grammar_mask
from engine.sampling.logprobs import PendingLogprobs, compute_logprobs, log_softmax_if_asked
from engine.sampling.metadata import SamplingMetadata, build_metadata
from engine.sampling.penalties import apply_bias_and_suppression, apply_penalties


@dataclass
class SamplingRow:
    """One sequence to sample a token for, as the runner sees it this step."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    # The request's own generator, seeded from params.seed; None: the sampler's shared one.
    generator: torch.Generator | None = None
    # Ids forbidden this step (EOS and stop_token_ids while len(output) < min_tokens).
    suppress_token_ids: tuple[int, ...] = field(default=())
    # When the last output token is still on the device: its row in the previous step's
    # sampled ids (``previous`` of ``Sampler.sample``); it follows ``output_token_ids``.
    pending_src: int | None = None


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]  # [B]
    logprobs: list[TokenLogprob | None]  # [B]; None where the row asked for none


@dataclass(frozen=True)
class DeviceSample:
    """What ``Sampler.sample`` leaves on the device: the chosen ids and their logprobs."""

    token_ids: torch.Tensor  # [B] int64
    logprobs: PendingLogprobs | None

    def tensors(self) -> list[torch.Tensor]:
        """Everything the host needs, to fetch in one go."""
        return [self.token_ids, *(self.logprobs.tensors() if self.logprobs else [])]

    def resolve(self, host: list[torch.Tensor]) -> SamplerOutput:
        """The host copies of ``tensors()``, in that order, as lists."""
        ids: list[int] = host[0].tolist()
        if self.logprobs is None:
            return SamplerOutput(ids, [None] * len(ids))
        return SamplerOutput(ids, self.logprobs.resolve(ids, host[1:]))


class Sampler:
    """Samples one token per row. Holds only the shared generator for unseeded rows."""

    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.vocab_size = vocab_size
        self.seed = seed
        # One shared generator per device, made on first use: a torch.Generator is tied
        # to a device and the sampler does not know the logits' device until it sees them.
        self._shared: dict[str, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
                 grammar: GrammarMasks | None = None) -> SamplerOutput:
        """Sample and wait for the result (tests, and callers with nothing to overlap)."""
        if not rows:
            self._check(logits, rows)
            return SamplerOutput([], [])
        sample = self.sample(logits, rows, grammar=grammar)
        return sample.resolve([t.cpu() for t in sample.tensors()])

    def sample(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
               previous: torch.Tensor | None = None,
               grammar: GrammarMasks | None = None) -> DeviceSample:
        """Queue the sampling of every row; nothing waits for the device. ``previous``: the
        previous step's sampled ids, for rows whose last token is pending there."""
        # logits: [B, V'] with V' >= vocab_size; columns past vocab_size are padding.
        # grammar: the token masks of the constrained rows, None when no row has one.
        self._check(logits, rows)
        meta = build_metadata(rows, self.vocab_size, logits.device, previous, grammar)
        x = self._masked_copy(logits, meta)  # [B, V]
        logprobs = log_softmax_if_asked(x, meta.num_logprobs)  # [B, V] or None
        self._process_in_place(x, meta)
        token_ids = self._choose(x, meta)  # [B]
        return DeviceSample(token_ids, compute_logprobs(logprobs, token_ids, meta.num_logprobs))

    def process(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
                grammar: GrammarMasks | None = None) -> torch.Tensor:
        """The logits each row picks from, as a new float32 [B, V] tensor: the grammar mask on
        constrained rows; bias, suppression and penalties on every row; temperature, top-k,
        top-p and min-p on sampled rows (cut tokens at -inf). Greedy rows take the argmax of
        their row, sampled rows draw from its softmax. The caller's ``logits`` are left
        intact."""
        self._check(logits, rows)
        meta = build_metadata(rows, self.vocab_size, logits.device, grammar=grammar)
        x = self._masked_copy(logits, meta)
        self._process_in_place(x, meta)
        return x

    def _check(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
        if logits.dim() != 2 or logits.shape[0] != len(rows) or logits.shape[1] < self.vocab_size:
            raise ValueError(f"logits must be [{len(rows)}, >= {self.vocab_size}], "
                             f"got {list(logits.shape)}")

    def _masked_copy(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        # logits: [B, V'] -> [B, V]. A contiguous float32 copy without the padding columns:
        # the stages edit it in place through flat [B * V] views.
        x = torch.empty((meta.num_rows, self.vocab_size), dtype=torch.float32,
                        device=logits.device)
        x.copy_(logits[:, :self.vocab_size])
        if meta.grammar is not None:
            apply_grammar_mask(x, meta.grammar)
        return x

    def _process_in_place(self, x: torch.Tensor, meta: SamplingMetadata) -> None:
        apply_bias_and_suppression(x, meta)
        apply_penalties(x, meta)
        if not meta.all_greedy:
            apply_temperature(x, meta)
            apply_top_k_top_p(x, meta)
            apply_min_p(x, meta)

    def _choose(self, x: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """Greedy rows: the argmax. Sampled rows: an exponential race over the softmax.
        Greedy rows went through every stage with neutral values, so their argmax here is the
        argmax of their penalised logits."""
        # x: [B, V] processed logits -> [B] token ids
        if meta.all_greedy:
            return x.argmax(dim=-1)
        probs = x.softmax(dim=-1)  # [B, V]
        noise = self._exponential_noise(meta.generators, x.shape, x.device)  # [B, V]
        sampled = probs.div_(noise).argmax(dim=-1)  # [B]
        if meta.greedy is None:
            return sampled
        return torch.where(meta.greedy, x.argmax(dim=-1), sampled)

    def _exponential_noise(self, generators: Sequence[torch.Generator | None],
                           shape: torch.Size, device: torch.device) -> torch.Tensor:
        """[B, V] i.i.d. Exp(1) draws: one draw for the whole batch from the shared generator,
        then each row that has its own generator overwritten by one [V] draw from it."""
        noise = torch.empty(shape, dtype=torch.float32, device=device)
        noise.exponential_(generator=self._shared_generator(device))
        for row, generator in enumerate(generators):
            if generator is not None:
                noise[row].exponential_(generator=generator)
        # An Exp(1) draw can be exactly 0; p / 0 would be inf (or nan for a cut token).
        return noise.clamp_min_(torch.finfo(torch.float32).tiny)

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        generator = self._shared.get(str(device))
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed)
            self._shared[str(device)] = generator
        return generator
