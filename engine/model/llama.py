"""The Llama forward pass over a flat batch of tokens, with pluggable linear and attention.

Modules in the manner of gpt-fast: Attention, FeedForward, TransformerBlock, LlamaModel. The
model owns no KV memory: the runner passes the per-layer caches and the step's metadata
explicitly on every call.
"""

from __future__ import annotations

import torch

from engine.checkpoint.types import LlamaArchConfig, LlamaLayerWeights, LlamaWeights
from engine.model.attention.base import AttentionBackend, AttentionMetadata
from engine.model.layers import RotaryEmbedding, rms_norm
from engine.model.linear.base import LinearBackend

KVCache = tuple[torch.Tensor, torch.Tensor]  # ([N, bs, Hkv, D], [N, bs, Hkv, D])


class Attention:
    def __init__(self, arch: LlamaArchConfig, w: LlamaLayerWeights, linear: LinearBackend,
                 attention: AttentionBackend, rotary: RotaryEmbedding) -> None:
        self.num_heads = arch.num_heads
        self.num_kv_heads = arch.num_kv_heads
        self.head_dim = arch.head_dim
        self.scale = self.head_dim ** -0.5
        self.q_proj = linear.make(w.q_proj)
        self.k_proj = linear.make(w.k_proj)
        self.v_proj = linear.make(w.v_proj)
        self.o_proj = linear.make(w.o_proj)
        self.attention = attention
        self.rotary = rotary

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj.forward(x).view(t, self.num_heads, self.head_dim)  # [T, H, D]
        k = self.k_proj.forward(x).view(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = self.v_proj.forward(x).view(t, self.num_kv_heads, self.head_dim)
        q = self.rotary.apply(q, positions)
        k = self.rotary.apply(k, positions)
        out = self.attention.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o_proj.forward(out.reshape(t, self.num_heads * self.head_dim))


class FeedForward:
    def __init__(self, w: LlamaLayerWeights, linear: LinearBackend) -> None:
        self.gate_proj = linear.make(w.gate_proj)
        self.up_proj = linear.make(w.up_proj)
        self.down_proj = linear.make(w.down_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.nn.functional.silu(self.gate_proj.forward(x))
        return self.down_proj.forward(gate * self.up_proj.forward(x))


class TransformerBlock:
    def __init__(self, arch: LlamaArchConfig, w: LlamaLayerWeights, linear: LinearBackend,
                 attention: AttentionBackend, rotary: RotaryEmbedding,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.eps = arch.rms_norm_eps
        self.input_norm = w.input_layernorm.to(device=device, dtype=dtype)
        self.post_norm = w.post_attention_layernorm.to(device=device, dtype=dtype)
        self.attn = Attention(arch, w, linear, attention, rotary)
        self.mlp = FeedForward(w, linear)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        h = x + self.attn.forward(rms_norm(x, self.input_norm, self.eps), positions, kv_cache, meta)
        return h + self.mlp.forward(rms_norm(h, self.post_norm, self.eps))


class LlamaModel:
    def __init__(self, arch: LlamaArchConfig, weights: LlamaWeights, linear: LinearBackend,
                 attention: AttentionBackend, dtype: torch.dtype, device: torch.device,
                 max_position: int) -> None:
        self.arch = arch
        self.dtype = dtype
        self.device = device
        self.linear_backend = linear
        self.attention_backend = attention
        rotary = RotaryEmbedding(arch.head_dim, max_position, arch.rope_theta, device)
        self.embed_tokens = weights.embed_tokens.to(device=device, dtype=dtype)  # [V, hidden]
        self.layers = [TransformerBlock(arch, w, linear, attention, rotary, dtype, device)
                       for w in weights.layers]
        self.norm = weights.norm.to(device=device, dtype=dtype)
        self.lm_head = weights.lm_head.to(device=device, dtype=dtype)  # [V, hidden]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden] (after the last norm)."""
        x = self.embed_tokens[input_ids]  # [T, hidden]
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer.forward(x, positions, kv_cache, meta)
        return rms_norm(x, self.norm, self.arch.rms_norm_eps)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> logits [N, V] float32."""
        return (hidden @ self.lm_head.t()).float()
