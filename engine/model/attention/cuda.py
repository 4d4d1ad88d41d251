"""The GPU attention backend: SDPA (flash) for fresh prompts, Triton kernels over the paged cache
for everything else.

Per step:
- decode-only steps (every sequence has one new token): one Triton paged-decode launch (plus a
  merge launch when contexts are split). Nothing here reads a device value on the host, so the
  step can be captured in a CUDA graph; the grid depends only on the batch size.
- other steps: prompts with no cached context (q_len == seq_len > 1) go through PyTorch's fused
  scaled_dot_product_attention on their contiguous new K/V (the flash kernel, causal), the rest
  (decode rows, prefill chunks that continue a cached context) through the Triton paged-prefill
  kernel, which skips the prompts SDPA took. Which sequence goes where is decided from the host
  copies in the metadata; the kernel applies the same rule on the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.model.attention.base import AttentionMetadata
from engine.model.attention.torch_ref import write_kv
from engine.model.attention.triton_paged import decode_num_parts, paged_decode, paged_prefill

# Above this many fresh prompts in one step, one Triton launch beats a host loop of SDPA calls.
_MAX_SDPA_PROMPTS = 8


class CudaAttentionBackend:
    name = "triton"

    def __init__(self, max_sdpa_prompts: int = _MAX_SDPA_PROMPTS) -> None:
        self.max_sdpa_prompts = max_sdpa_prompts
        # Multiprocessor count, read once: it sizes the decode split.
        self._num_sms: int | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float, kv_written: bool = False,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, Hkv, D] -> [T, H, D]. See AttentionBackend."""
        if not kv_written:
            write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.decode_only:
            # max_seq_len may be an upper bound (CUDA-graph capture passes max_model_len).
            parts = decode_num_parts(meta.num_seqs, q.shape[1], meta.max_seq_len,
                                     self._sm_count(q.device))
            decoded = paged_decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale,
                                   parts)
            return decoded if out is None else out.copy_(decoded)
        fresh = [i for i in range(meta.num_seqs) if _is_fresh_prompt(meta, i)]
        use_sdpa = 0 < len(fresh) <= self.max_sdpa_prompts
        out = torch.empty_like(q) if out is None else out
        if not use_sdpa or len(fresh) < meta.num_seqs:
            paged_prefill(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                          meta.query_start_loc, meta.max_query_len, scale, out,
                          skip_fresh=use_sdpa)
        if use_sdpa:
            for i in fresh:
                start, end = meta.query_start_loc_cpu[i], meta.query_start_loc_cpu[i + 1]
                out[start:end] = causal_sdpa(q[start:end], k[start:end], v[start:end], scale)
        return out

    def warm_up(self, k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int) -> None:
        """Compile every variant of the paged prefill kernel that a step can launch.

        Which variant a step needs depends on things the engine-level warm-up (one prompt a
        step) never meets: SKIP_FRESH (a fresh prompt beside decodes or later chunks) and the
        block table's row stride, the longest sequence's block count in the step, which Triton
        specialises as 1, divisible by 16, or neither. Each variant is launched once on one
        dummy two-token sequence; it only reads the cache."""
        device = k_cache.device
        head_dim = k_cache.shape[3]
        q = torch.zeros((2, num_heads, head_dim), dtype=k_cache.dtype, device=device)
        out = torch.empty_like(q)
        seq_lens = torch.tensor([2], dtype=torch.int32, device=device)
        query_start_loc = torch.tensor([0, 2], dtype=torch.int32, device=device)
        for blocks in (1, 3, 16):
            block_tables = torch.zeros((1, blocks), dtype=torch.int32, device=device)
            for skip_fresh in (False, True):
                paged_prefill(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, 2,
                              1.0, out, skip_fresh=skip_fresh)

    def _sm_count(self, device: torch.device) -> int:
        if self._num_sms is None:
            self._num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
                             if device.type == "cuda" else 1)
        return self._num_sms


def _is_fresh_prompt(meta: AttentionMetadata, i: int) -> bool:
    q_len = meta.query_start_loc_cpu[i + 1] - meta.query_start_loc_cpu[i]
    return q_len > 1 and q_len == meta.seq_lens_cpu[i]


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One prompt with no earlier context: q: [L, H, D], k/v: [L, Hkv, D] -> [L, H, D]."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        # Expanded explicitly: the flash path takes no grouped heads in every torch version.
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    # [1, H, L, D] views: the flash kernel wants 4-d inputs with a contiguous last dim.
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                         v.transpose(0, 1)[None], is_causal=True, scale=scale)
    return out[0].transpose(0, 1)
