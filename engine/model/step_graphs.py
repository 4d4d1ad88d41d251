"""Steps the decode graphs do not take (prompts, prefill chunks, mixed batches) run as CUDA
graphs between their attention calls: one graph per layer boundary and token-count bucket.

Why: an eager 512-token prefill of a 13B queues ~570 kernels from Python. On an H200 the host
took 21.6 ms to queue what the GPU ran in 28.6 ms, and the GPU still waited on it at every
layer's attention (small kernels, slow launches): the forward ended 3.4 ms after its kernels'
sum. Smaller steps (a prefill chunk beside decodes) are bound by the host outright. Everything
in a layer but attention depends only on the step's token count, so it is captured once per
bucket; attention, whose work depends on each sequence's context, runs eagerly in between,
reading q/k/v from the graph's own buffers and writing a static buffer the next graph reads.

Invariants:
- Pieces: piece 0 is the embedding and layer 0 up to its attention (norm, q/k/v, rotary and
  cache write); piece i the rest of layer i-1 (o_proj, norm, MLP) and layer i up to its
  attention; piece L the last layer's rest and the final norm.
- Rows T..bucket are padding. Their cache slot is reset to ``sink_slot`` every step (a slot the
  block manager never hands out: the rotary kernel writes their K/V there); their token ids and
  positions keep stale but valid values. Attention takes only the first T rows, with the
  step's own metadata, and every other kernel works row by row, so padding never reaches a
  real row.
- Each piece's rotary kernel writes its layer's q/k/v into static buffers, which attention
  reads (one layer's worth: keeping each piece's own q/k/v alive would hold 40).
- Graphs of every bucket share one memory pool, the largest bucket captured first. A piece's
  residual output is dropped once the next piece is captured, so the pool holds about one
  layer's temporaries; replays run in capture order within a step, and one step's replays
  finish (stream order) before the next step's begin. The hidden states returned are the
  graph's buffer: read them before the next replay.
- A step that is one prompt with no cached context (what an idle server's next request
  runs) replays one graph of the whole forward instead, attention included: causal attention
  over the step's own rows, padding rows last, reads no padding row from a real one.
- Steps with LoRA rows run eagerly (their kernels' segments are not captured here).
"""

from __future__ import annotations

import logging
import time

import torch

from engine.model.attention.base import AttentionMetadata
from engine.model.llama import KVCache, LlamaModel
from engine.progress import timed_stage

log = logging.getLogger(__name__)

# The smallest bucket, and the spacing of buckets above 128 tokens: padding costs at most
# 64 tokens of linear work there, which at 128+ tokens is compute the host would have wasted.
_MIN_BUCKET = 16
_STEP = 64


def token_buckets(max_tokens: int) -> list[int]:
    """16, 32, 64, 128, then every multiple of 64 up to max_tokens (and max_tokens itself);
    empty when max_tokens is 0."""
    if max_tokens <= 0:
        return []
    buckets = [b for b in (16, 32, 64, 128) if b < max_tokens]
    buckets += list(range(128 + _STEP, max_tokens, _STEP))
    return sorted({*buckets, max(max_tokens, _MIN_BUCKET)})


class StepGraphs:
    def __init__(self, model: LlamaModel, kv_caches: list[KVCache], max_tokens: int,
                 sink_slot: int) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.sink_slot = sink_slot
        self.buckets = token_buckets(max_tokens)
        size = self.buckets[-1]
        device, arch = model.device, model.arch
        self.input_ids = torch.zeros(size, dtype=torch.int64, device=device)
        self.positions = torch.zeros(size, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((size,), sink_slot, dtype=torch.int64, device=device)
        heads = (arch.num_heads, arch.num_kv_heads, arch.num_kv_heads)
        # Each piece's rotary kernel writes its layer's q/k/v here for attention (one layer's
        # worth, where keeping every piece's own buffers alive would hold 40), and attention
        # writes its output into attn_out, the next piece's input.
        q, k, v = (torch.zeros((size, h, arch.head_dim), dtype=model.dtype, device=device)
                   for h in heads)
        self.qkv = (q, k, v)
        self.attn_out = torch.zeros((size, arch.num_heads, arch.head_dim), dtype=model.dtype,
                                    device=device)
        self._graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self._hidden: dict[int, torch.Tensor] = {}  # bucket -> final hidden [bucket, hidden]
        # bucket -> the whole-forward graph of a step that is one fresh prompt, and its output.
        self._prompt_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._prompt_hidden: dict[int, torch.Tensor] = {}
        self._pool = torch.cuda.graph_pool_handle()

    @property
    def max_tokens(self) -> int:
        return self.buckets[-1]

    def bucket_for(self, num_tokens: int) -> int | None:
        for bucket in self.buckets:
            if bucket >= num_tokens:
                return bucket
        return None

    def capture(self) -> None:
        start = time.monotonic()
        for bucket in reversed(self.buckets):
            self._capture(bucket)
            self._capture_prompt(bucket)
        timed_stage(log, "CUDA graphs", start, f"{len(self.model.layers) + 1} pieces and a "
                    f"whole-prompt graph captured for each step size of {self.buckets} tokens")

    @staticmethod
    def is_one_prompt(meta: AttentionMetadata) -> bool:
        """Whether the step is one prompt with no cached context (its first chunk, or all of
        it): the whole-prompt graph takes it."""
        return meta.num_seqs == 1 and meta.seq_lens_cpu[0] == meta.query_start_loc_cpu[1]

    @torch.inference_mode()
    def _capture(self, bucket: int) -> None:
        model, layers = self.model, self.model.layers
        ids, positions = self.input_ids[:bucket], self.positions[:bucket]
        slots, attn = self.slot_mapping[:bucket], self.attn_out[:bucket]

        q, k, v = self.qkv
        qkv = (q[:bucket], k[:bucket], v[:bucket])

        def first() -> torch.Tensor:
            return layers[0].before_attention(model.embed(ids), None, positions,
                                              self.kv_caches[0], slots, None, qkv)[0]

        def middle(i: int, x: torch.Tensor) -> torch.Tensor:
            h, pending = layers[i - 1].after_attention(x, attn, None)
            return layers[i].before_attention(h, pending, positions, self.kv_caches[i], slots,
                                              None, qkv)[0]

        def last(x: torch.Tensor) -> torch.Tensor:
            return model.final_norm(*layers[-1].after_attention(x, attn, None))

        # A warm-up pass outside any graph compiles the Triton kernels of this size and sets up
        # cuBLAS, neither of which may happen during capture; every row is padding, so its
        # only cache writes go to the sink slot.
        self.slot_mapping[:bucket].fill_(self.sink_slot)
        x = first()
        for i in range(1, len(layers)):
            x = middle(i, x)
        last(x)
        torch.cuda.synchronize()

        graphs = [torch.cuda.CUDAGraph() for _ in range(len(layers) + 1)]
        with torch.cuda.graph(graphs[0], pool=self._pool):
            x = first()
        for i in range(1, len(layers)):
            # The previous piece's output (x) is referenced until this capture has read it;
            # after that the pool may reuse its memory, in later pieces.
            with torch.cuda.graph(graphs[i], pool=self._pool):
                x = middle(i, x)
        with torch.cuda.graph(graphs[-1], pool=self._pool):
            hidden = last(x)
        self._graphs[bucket] = graphs
        self._hidden[bucket] = hidden

    @torch.inference_mode()
    def _capture_prompt(self, bucket: int) -> None:
        """The whole forward, attention included, of a step that is one prompt with no cached
        context: its attention is causal over the step's own rows, with the padding rows
        last, so no real row reads a padding row and nothing depends on the metadata."""
        # Imported here: the CUDA attention module needs Triton, which CPU installs may lack.
        from engine.model.attention.cuda import causal_sdpa

        model = self.model
        ids, positions = self.input_ids[:bucket], self.positions[:bucket]
        slots = self.slot_mapping[:bucket]

        def forward() -> torch.Tensor:
            x, pending = model.embed(ids), None
            for layer, kv_cache in zip(model.layers, self.kv_caches, strict=True):
                x, q, k, v = layer.before_attention(x, pending, positions, kv_cache, slots, None)
                x, pending = layer.after_attention(x, causal_sdpa(q, k, v, layer.attn.scale),
                                                   None)
            return model.final_norm(x, pending)

        self.slot_mapping[:bucket].fill_(self.sink_slot)
        forward()  # the warm-up, as in _capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            hidden = forward()
        self._prompt_graphs[bucket] = graph
        self._prompt_hidden[bucket] = hidden

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor,
            meta: AttentionMetadata) -> torch.Tensor:
        """One step of T = len(input_ids) rows -> its final hidden states [T, hidden] (the
        graph's buffer: read it before the next replay)."""
        t = input_ids.shape[0]
        bucket = self.bucket_for(t)
        if bucket is None:
            raise ValueError(f"no step graph for {t} tokens (at most {self.max_tokens})")
        self.input_ids[:t].copy_(input_ids, non_blocking=True)
        self.positions[:t].copy_(positions, non_blocking=True)
        self.slot_mapping[:t].copy_(meta.slot_mapping, non_blocking=True)
        if t < bucket:  # a live slot from an earlier step must not take padding K/V
            self.slot_mapping[t:bucket].fill_(self.sink_slot)
        if self.is_one_prompt(meta):
            self._prompt_graphs[bucket].replay()
            return self._prompt_hidden[bucket][:t]
        graphs = self._graphs[bucket]
        q, k, v = (buf[:t] for buf in self.qkv)
        out = self.attn_out[:t]
        for layer, kv_cache, graph in zip(self.model.layers, self.kv_caches, graphs,
                                          strict=False):
            graph.replay()
            layer.attn.attend(q, k, v, kv_cache, meta, out=out)
        graphs[-1].replay()
        return self._hidden[bucket][:t]
