"""Per-batch sampling tensors, built on the host in one pass and uploaded in one copy per
dtype (``engine.transfer.Upload``, shared with batch building).

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
from engine.transfer import Slot, Upload

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
                   previous: torch.Tensor | None = None,
                   grammar: GrammarMasks | None = None) -> SamplingMetadata:
    """``previous``: the previous step's sampled ids ([S'] int64, on ``device``), which hold
    the last output token of rows whose ``pending_src`` is set (penalties count it).
    ``grammar``: the constrained rows' token masks, None when no row has a grammar."""
    params: list[SamplingParams] = [r.params for r in rows]
    greedy = [p.greedy for p in params]
    up = Upload()
    section: dict[str, Slot] = {}

    def floats_if(name: str, values: list[float], neutral: float) -> None:
        if any(v != neutral for v in values):
            section[name] = up.add(values, torch.float32)

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
        section["top_k"] = up.add(top_k, torch.int64)

    bias = [(i * vocab + t, float(b)) for i, p in enumerate(params)
            for t, b in p.logit_bias.items() if 0 <= t < vocab and b != 0.0]
    if bias:
        section["bias_index"] = up.add([k for k, _ in bias], torch.int64)
        section["bias_value"] = up.add([v for _, v in bias], torch.float32)
    suppress = [i * vocab + t for i, r in enumerate(rows) for t in r.suppress_token_ids
                if 0 <= t < vocab]
    if suppress:
        section["suppress_index"] = up.add(suppress, torch.int64)
    counted_rows = [i for i, p in enumerate(params) if p.frequency_penalty != 0.0
                    or p.presence_penalty != 0.0 or p.repetition_penalty != 1.0]
    if counted_rows:
        section["output_index"] = up.add(_flat_token_index(
            [(i, rows[i].output_token_ids) for i in counted_rows], vocab), torch.int64)
        # A counted row's last output token may still be on the device (the previous step
        # sampled it): its index row * V + id is completed there, after the upload.
        waiting = [i for i in counted_rows if rows[i].pending_src is not None]
        if waiting:
            section["pending_row"] = up.add(waiting, torch.int64)
            section["pending_src"] = up.add([rows[i].pending_src for i in waiting], torch.int64)
    repeated = [(i, r.prompt_token_ids) for i, (r, p) in enumerate(zip(rows, params, strict=True))
                if p.repetition_penalty != 1.0]
    if repeated:
        section["prompt_index"] = up.add(_flat_token_index(repeated, vocab), torch.int64)
    if grammar is not None and len(grammar.rows) < len(rows):
        section["grammar_rows"] = up.add(list(grammar.rows), torch.int64)

    dev = up.send(device)

    def view(name: str, column: bool = False) -> torch.Tensor | None:
        slot = section.get(name)
        if slot is None:
            return None
        return dev[slot].unsqueeze(1) if column else dev[slot]

    output_index = view("output_index")
    pending_row, pending_src = view("pending_row"), view("pending_src")
    if pending_row is not None and pending_src is not None and output_index is not None:
        assert previous is not None, "a row counts a pending token no step sampled"
        output_index = torch.cat([output_index, pending_row * vocab + previous[pending_src]])
    all_greedy = all(greedy)
    mixed = view("greedy") if not all_greedy else None
    return SamplingMetadata(
        num_rows=len(rows),
        vocab_size=vocab,
        all_greedy=all_greedy,
        greedy=None if mixed is None else mixed > 0.5,
        temperature=view("temperature", column=True),
        top_k=view("top_k", column=True),
        top_p=view("top_p", column=True),
        log_min_p=view("log_min_p", column=True),
        repetition_penalty=view("repetition_penalty", column=True),
        frequency_penalty=view("frequency_penalty", column=True),
        presence_penalty=view("presence_penalty", column=True),
        bias_index=view("bias_index"),
        bias_value=view("bias_value"),
        suppress_index=view("suppress_index"),
        output_index=output_index,
        prompt_index=view("prompt_index"),
        generators=tuple(None if g else r.generator for r, g in zip(rows, greedy, strict=True)),
        num_logprobs=tuple(p.logprobs for p in params),
        grammar=None if grammar is None else upload_grammar_masks(
            grammar, len(rows), vocab, device, view("grammar_rows")),
    )
