"""Per-batch sampling tensors, built on the host in one pass and uploaded in two copies.

Every stage of the sampler runs on the whole batch. A row that did not ask for a stage gets the
neutral value (temperature 1, top_k V, top_p +inf, log(min_p) -inf, repetition penalty 1,
presence/frequency 0), which leaves its logits bit-for-bit unchanged. So no stage gathers or
scatters row subsets, each row's result depends on that row alone, and a stage no row asked for
is skipped (its tensor is None).
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.params import SamplingParams
from engine.sampling.grammar_mask import DeviceGrammarMask, GrammarMasks, upload_grammar_masks

if TYPE_CHECKING:
    from engine.sampling.sampler import SamplingRow


@dataclass(frozen=True)
class SamplingMetadata:
    num_rows: int
    vocab_size: int
    all_greedy: bool
    # [B] bool, only when the batch mixes greedy and sampled rows.
    greedy: torch.Tensor | None
    temperature: torch.Tensor | None  # [B, 1]
    top_k: torch.Tensor | None  # [B, 1] int64
    top_p: torch.Tensor | None  # [B, 1]
    log_min_p: torch.Tensor | None  # [B, 1]
    repetition_penalty: torch.Tensor | None  # [B, 1]
    frequency_penalty: torch.Tensor | None  # [B, 1]
    presence_penalty: torch.Tensor | None  # [B, 1]
    # Positions in the flattened [B * V] logits (row * V + token id):
    bias_index: torch.Tensor | None  # [N] int64, with bias_value [N]
    bias_value: torch.Tensor | None
    suppress_index: torch.Tensor | None  # [N] int64
    output_index: torch.Tensor | None  # [N] int64: one entry per output token of rows that count
    prompt_index: torch.Tensor | None  # [N] int64: prompt tokens of repetition-penalty rows
    # The row's own generator, for sampled rows that have one.
    generators: tuple[torch.Generator | None, ...]
    num_logprobs: tuple[int | None, ...]
    # The constrained rows' token masks; None when no row of the step has a grammar.
    grammar: DeviceGrammarMask | None = None


class _Upload:
    """Sections of one float32 and one int64 host buffer; ``send`` copies each buffer once and
    hands out views of it."""

    def __init__(self) -> None:
        self._floats: list[float] = []
        self._ints: list[torch.Tensor] = []
        self._num_ints = 0

    def floats(self, values: Sequence[float]) -> slice:
        start = len(self._floats)
        self._floats.extend(values)
        return slice(start, len(self._floats))

    def ints(self, values: torch.Tensor) -> slice:
        start = self._num_ints
        self._ints.append(values)
        self._num_ints += values.numel()
        return slice(start, self._num_ints)

    def send(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        floats = torch.tensor(self._floats, dtype=torch.float32)
        ints = torch.cat(self._ints) if self._ints else torch.empty(0, dtype=torch.int64)
        return _to_device(floats, device), _to_device(ints, device)


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    # Pinned and non-blocking: a blocking upload, or one from pageable memory, may wait for the
    # stream, that is for the model's forward pass, before the sampler could queue anything.
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _flat_token_index(token_lists: Sequence[tuple[int, Sequence[int]]],
                      vocab: int) -> torch.Tensor:
    """row * V + id for every (row, ids) pair, as a host int64 tensor; ids outside the
    vocabulary are dropped. Built through array('q') because it converts a list of Python ints
    several times faster than torch.tensor."""
    ids = array("q")
    offsets = array("q")
    for row, token_ids in token_lists:
        ids.extend(token_ids)
        offsets.extend(array("q", [row * vocab]) * len(token_ids))
    if not ids:
        return torch.empty(0, dtype=torch.int64)
    t = torch.frombuffer(ids, dtype=torch.int64)
    flat = t + torch.frombuffer(offsets, dtype=torch.int64)
    return flat[(t >= 0) & (t < vocab)]


def build_metadata(rows: Sequence[SamplingRow], vocab: int, device: torch.device,
                   grammar: GrammarMasks | None = None) -> SamplingMetadata:
    params: list[SamplingParams] = [r.params for r in rows]
    greedy = [p.greedy for p in params]
    up = _Upload()
    section: dict[str, slice] = {}

    def floats_if(name: str, values: list[float], neutral: float) -> None:
        if any(v != neutral for v in values):
            section[name] = up.floats(values)

    floats_if("greedy", [1.0 if g else 0.0 for g in greedy], 0.0)
    floats_if("temperature", [1.0 if p.greedy else p.temperature for p in params], 1.0)
    floats_if("top_p", [math.inf if p.greedy or p.top_p >= 1.0 else p.top_p for p in params],
              math.inf)
    floats_if("log_min_p", [math.log(p.min_p) if p.min_p > 0.0 and not p.greedy else -math.inf
                            for p in params], -math.inf)
    floats_if("repetition_penalty", [p.repetition_penalty for p in params], 1.0)
    floats_if("frequency_penalty", [p.frequency_penalty for p in params], 0.0)
    floats_if("presence_penalty", [p.presence_penalty for p in params], 0.0)
    top_k = [vocab if p.greedy or p.top_k is None else min(p.top_k, vocab) for p in params]
    if any(k < vocab for k in top_k):
        section["top_k"] = up.ints(torch.tensor(top_k, dtype=torch.int64))

    bias = [(i * vocab + t, float(b)) for i, p in enumerate(params)
            for t, b in p.logit_bias.items() if 0 <= t < vocab and b != 0.0]
    if bias:
        section["bias_index"] = up.ints(torch.tensor([k for k, _ in bias], dtype=torch.int64))
        section["bias_value"] = up.floats([v for _, v in bias])
    suppress = [i * vocab + t for i, r in enumerate(rows) for t in r.suppress_token_ids
                if 0 <= t < vocab]
    if suppress:
        section["suppress_index"] = up.ints(torch.tensor(suppress, dtype=torch.int64))
    counted = [(i, r.output_token_ids) for i, (r, p) in enumerate(zip(rows, params, strict=True))
               if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
               or p.repetition_penalty != 1.0]
    if counted:
        section["output_index"] = up.ints(_flat_token_index(counted, vocab))
    repeated = [(i, r.prompt_token_ids) for i, (r, p) in enumerate(zip(rows, params, strict=True))
                if p.repetition_penalty != 1.0]
    if repeated:
        section["prompt_index"] = up.ints(_flat_token_index(repeated, vocab))
    if grammar is not None and len(grammar.rows) < len(rows):
        section["grammar_rows"] = up.ints(torch.tensor(grammar.rows, dtype=torch.int64))

    floats, ints = up.send(device)

    def view(name: str, buffer: torch.Tensor, column: bool = False) -> torch.Tensor | None:
        s = section.get(name)
        if s is None:
            return None
        return buffer[s].unsqueeze(1) if column else buffer[s]

    all_greedy = all(greedy)
    mixed = view("greedy", floats) if not all_greedy else None
    return SamplingMetadata(
        num_rows=len(rows),
        vocab_size=vocab,
        all_greedy=all_greedy,
        greedy=None if mixed is None else mixed > 0.5,
        temperature=view("temperature", floats, column=True),
        top_k=view("top_k", ints, column=True),
        top_p=view("top_p", floats, column=True),
        log_min_p=view("log_min_p", floats, column=True),
        repetition_penalty=view("repetition_penalty", floats, column=True),
        frequency_penalty=view("frequency_penalty", floats, column=True),
        presence_penalty=view("presence_penalty", floats, column=True),
        bias_index=view("bias_index", ints),
        bias_value=view("bias_value", floats),
        suppress_index=view("suppress_index", ints),
        output_index=view("output_index", ints),
        prompt_index=view("prompt_index", ints),
        generators=tuple(None if g else r.generator for r, g in zip(rows, greedy, strict=True)),
        num_logprobs=tuple(p.logprobs for p in params),
        grammar=None if grammar is None else upload_grammar_masks(
            grammar, len(rows), vocab, device, view("grammar_rows", ints)),
    )
