"""Decode steps captured in CUDA graphs, one graph per batch-size bucket.

A 13B decode step is ~40 layers x ~15 kernel launches; launched one by one from Python the
launch gaps cost more than the small-batch kernels themselves. Captured once per bucket and
replayed, a step is one launch.

Invariants:
- Every captured input lives in a static buffer; a step copies its tensors into the first n rows
  and the graph reads them in place. Sizes the kernels need come from device tensors (seq_lens,
  block tables), never from host values baked in at capture.
- Rows n..bucket are padding. Each step resets their seq_len to 0 (attention reads nothing for
  them) and their cache slot to ``sink_slot``, a slot the block manager never hands out, so a
  padding row can never overwrite a live sequence's K/V.
- Attention sees max_seq_len = max_model_len at capture: an upper bound, which is all the decode
  kernel uses it for (its split count).
- All graphs share one memory pool; the largest bucket is captured first.
- With LoRA on (and graph-capturable LoRA kernels), each bucket has two graphs: one without
  LoRA kernels for steps whose rows are all the base model's (they pay nothing for LoRA), and
  one that reads the step's adapter segments from static buffers (``sorted_rows``,
  ``seg_start``). Padding rows are in no segment, so they get no delta.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from engine.model.attention.base import AttentionMetadata
from engine.model.llama import KVCache, LlamaModel
from engine.model.lora.base import LoraBatch
from engine.progress import timed_stage

log = logging.getLogger(__name__)


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to max_num_seqs (and max_num_seqs itself)."""
    buckets = [b for b in (1, 2, 4) if b < max_num_seqs]
    buckets += list(range(8, max_num_seqs, 8))
    return sorted({*buckets, max_num_seqs})


@dataclass(frozen=True)
class DecodeGraphConfig:
    max_num_seqs: int  # the largest bucket
    max_model_len: int  # sizes the static block tables; the attention's max_seq_len bound
    # The other steps of up to this many tokens run as piecewise graphs (step_graphs.py); 0: off.
    step_max_tokens: int = 0


@dataclass
class _StaticInputs:
    input_ids: torch.Tensor  # [B] int64
    positions: torch.Tensor  # [B] int64
    slot_mapping: torch.Tensor  # [B] int64
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor  # [B+1] int32: 0..B, fixed (one query row per sequence)
    # The LoRA graphs' side input (None without LoRA): rows grouped by slot, segment starts.
    lora: LoraBatch | None


class DecodeGraphs:
    def __init__(self, model: LlamaModel, kv_caches: list[KVCache], config: DecodeGraphConfig,
                 block_size: int, sink_slot: int) -> None:
        self.model = model
        self.kv_caches = kv_caches
        max_model_len = config.max_model_len
        self.max_model_len = max_model_len
        self.sink_slot = sink_slot
        self.buckets = batch_buckets(config.max_num_seqs)
        size = self.buckets[-1]
        device = model.device
        self.static = _StaticInputs(
            input_ids=torch.zeros(size, dtype=torch.int64, device=device),
            positions=torch.zeros(size, dtype=torch.int64, device=device),
            slot_mapping=torch.full((size,), sink_slot, dtype=torch.int64, device=device),
            seq_lens=torch.zeros(size, dtype=torch.int32, device=device),
            block_tables=torch.zeros((size, -(-max_model_len // block_size)), dtype=torch.int32,
                                     device=device),
            query_start_loc=torch.arange(size + 1, dtype=torch.int32, device=device),
            lora=None if model.lora is None or not model.lora.kernels.graph_capturable
            else LoraBatch(sorted_rows=torch.zeros(size, dtype=torch.int32, device=device),
                           seg_start=torch.zeros(model.lora.max_loras + 1, dtype=torch.int32,
                                                 device=device), groups=()))
        # (bucket, with LoRA) -> graph and its output: logits [bucket, V] float32.
        self._graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self._logits: dict[tuple[int, bool], torch.Tensor] = {}
        self._pool: object | None = None

    @property
    def captures_lora(self) -> bool:
        return self.static.lora is not None

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def capture(self) -> None:
        """Capture every bucket, largest first (later captures reuse its pool memory)."""
        start = time.monotonic()
        for bucket in reversed(self.buckets):
            for with_lora in ((False, True) if self.captures_lora else (False,)):
                self._capture(bucket, with_lora)
        timed_stage(log, "CUDA graphs", start, f"decode captured for batch sizes {self.buckets}"
                    + (" (with and without LoRA)" if self.captures_lora else ""))

    def _meta(self, bucket: int) -> AttentionMetadata:
        s = self.static
        return AttentionMetadata(
            slot_mapping=s.slot_mapping[:bucket], query_start_loc=s.query_start_loc[:bucket + 1],
            seq_lens=s.seq_lens[:bucket], block_tables=s.block_tables[:bucket],
            max_query_len=1, max_seq_len=self.max_model_len, num_seqs=bucket, decode_only=True,
            query_start_loc_cpu=list(range(bucket + 1)), seq_lens_cpu=[0] * bucket)

    @torch.inference_mode()
    def _capture(self, bucket: int, with_lora: bool) -> None:
        s, meta = self.static, self._meta(bucket)
        lora = s.lora if with_lora else None
        if lora is not None:
            lora.seg_start.zero_()  # every row is padding: the LoRA kernels exit at once

        def step() -> torch.Tensor:
            hidden = self.model.forward(s.input_ids[:bucket], s.positions[:bucket],
                                        self.kv_caches, meta, lora)  # [bucket, hidden]
            return self.model.compute_logits(hidden)  # [bucket, V]

        # A warm-up run outside the graph compiles Triton kernels and sets up cuBLAS handles,
        # neither of which may happen during capture. All rows are padding: it writes only the
        # sink slot.
        self._reset_padding(0, bucket)
        step()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = step()
        if self._pool is None:
            self._pool = graph.pool()
        self._graphs[bucket, with_lora] = graph
        self._logits[bucket, with_lora] = logits

    def bucket_for(self, num_seqs: int) -> int | None:
        """The smallest captured batch size that fits num_seqs, or None if none does."""
        for bucket in self.buckets:
            if bucket >= num_seqs:
                return bucket
        return None

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            meta: AttentionMetadata, lora: LoraBatch | None = None) -> torch.Tensor:
        """A decode step of n = meta.num_seqs rows -> logits [n, V] float32.

        The returned tensor is the graph's output buffer: read it before the next replay.
        """
        n = meta.num_seqs
        bucket = self.bucket_for(n)
        if bucket is None or not meta.decode_only:
            raise ValueError(f"no decode graph for {n} sequences (decode_only={meta.decode_only})")
        if lora is not None and self.static.lora is None:
            raise ValueError("these decode graphs were captured without LoRA")
        s = self.static
        s.input_ids[:n].copy_(input_ids, non_blocking=True)
        s.positions[:n].copy_(positions, non_blocking=True)
        s.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        s.seq_lens[:n].copy_(meta.seq_lens, non_blocking=True)
        width = meta.block_tables.shape[1]
        # Columns past `width` keep stale entries: the kernel never reads past seq_len.
        s.block_tables[:n, :width].copy_(meta.block_tables, non_blocking=True)
        if lora is not None:
            assert s.lora is not None
            # Entries past the last segment's end keep stale rows: no program reads them.
            s.lora.sorted_rows[:lora.sorted_rows.shape[0]].copy_(lora.sorted_rows,
                                                                 non_blocking=True)
            s.lora.seg_start.copy_(lora.seg_start, non_blocking=True)
        self._reset_padding(n, bucket)
        key = (bucket, lora is not None)
        self._graphs[key].replay()
        return self._logits[key][:n]

    def _reset_padding(self, start: int, end: int) -> None:
        if start < end:
            self.static.seq_lens[start:end].zero_()
            self.static.slot_mapping[start:end].fill_(self.sink_slot)
