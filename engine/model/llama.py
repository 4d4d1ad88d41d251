"""The Llama forward pass over a flat batch of tokens, with pluggable linear and attention.

Modules in the manner of gpt-fast: Attention, FeedForward, TransformerBlock, LlamaModel. The
model owns no KV memory: the runner passes the per-layer caches and the step's metadata
explicitly on every call.

On CUDA two things change, neither the arithmetic: q/k/v (and gate/up) are one linear layer
over their output-concatenated weights when their quantisation layout allows it (fewer, larger
kernels), and the norms, rotary embedding and SiLU run as fused Triton kernels
(engine/model/triton_fused.py) instead of ~40 small torch kernels per layer.
"""

from __future__ import annotations

from types import ModuleType

import torch

from engine.checkpoint.types import (
    GPTQLinearWeights,
    LlamaArchConfig,
    LlamaLayerWeights,
    LlamaWeights,
)
from engine.model.attention.base import AttentionBackend, AttentionMetadata
from engine.model.layers import RotaryEmbedding, rms_norm
from engine.model.linear.base import LinearBackend, QuantLinear

KVCache = tuple[torch.Tensor, torch.Tensor]  # ([N, bs, Hkv, D], [N, bs, Hkv, D])


def fused_ops() -> ModuleType:
    """The Triton kernels module, imported on first use: Triton exists only where CUDA does."""
    from engine.model import triton_fused

    return triton_fused


def concat_outputs(name: str, parts: list[GPTQLinearWeights]) -> GPTQLinearWeights | None:
    """One layer computing every part's outputs side by side, or None when the parts cannot
    share a layer: the same input rows must map to the same groups (g_idx), which holds for
    q/k/v and gate/up of GPTQ checkpoints quantised from one Hessian per input."""
    first = parts[0]
    for p in parts[1:]:
        same_idx = (p.g_idx is None and first.g_idx is None) or (
            p.g_idx is not None and first.g_idx is not None and torch.equal(p.g_idx, first.g_idx))
        if (p.bits, p.group_size, p.in_features) != (first.bits, first.group_size,
                                                     first.in_features) or not same_idx:
            return None
        if (p.bias is None) != (first.bias is None):
            return None
    return GPTQLinearWeights(
        name=name, qweight=torch.cat([p.qweight for p in parts], dim=1),
        qzeros=torch.cat([p.qzeros for p in parts], dim=1),
        scales=torch.cat([p.scales for p in parts], dim=1), g_idx=first.g_idx, bits=first.bits,
        group_size=first.group_size, in_features=first.in_features,
        out_features=sum(p.out_features for p in parts),
        bias=None if first.bias is None else torch.cat([p.bias for p in parts]))  # type: ignore[misc]


class Attention:
    def __init__(self, arch: LlamaArchConfig, w: LlamaLayerWeights, linear: LinearBackend,
                 attention: AttentionBackend, rotary: RotaryEmbedding, fuse: bool) -> None:
        self.num_heads = arch.num_heads
        self.num_kv_heads = arch.num_kv_heads
        self.head_dim = arch.head_dim
        self.scale = self.head_dim ** -0.5
        self.fused = fuse
        qkv = concat_outputs(w.q_proj.name.rsplit(".", 1)[0] + ".qkv_proj",
                             [w.q_proj, w.k_proj, w.v_proj]) if fuse else None
        self.qkv_proj: QuantLinear | None = None if qkv is None else linear.make(qkv)
        self.projs: tuple[QuantLinear, ...] = () if qkv is not None else (
            linear.make(w.q_proj), linear.make(w.k_proj), linear.make(w.v_proj))
        self.o_proj = linear.make(w.o_proj)
        self.attention = attention
        self.rotary = rotary

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if self.qkv_proj is not None:
            qkv = self.qkv_proj.forward(x)  # [T, q_size + 2 * kv_size]
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=1)
        else:
            q, k, v = (proj.forward(x) for proj in self.projs)
        q = q.view(t, self.num_heads, self.head_dim)  # [T, H, D] (rows may be strided)
        k = k.view(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.fused:
            fused_ops().rotary_(q, k, positions, self.rotary.cos, self.rotary.sin)
        else:
            q = self.rotary.apply(q, positions)
            k = self.rotary.apply(k, positions)
        out = self.attention.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o_proj.forward(out.reshape(t, q_size))


class FeedForward:
    def __init__(self, w: LlamaLayerWeights, linear: LinearBackend, fuse: bool) -> None:
        gate_up = concat_outputs(w.gate_proj.name.rsplit(".", 1)[0] + ".gate_up_proj",
                                 [w.gate_proj, w.up_proj]) if fuse else None
        self.gate_up_proj: QuantLinear | None = None if gate_up is None else linear.make(gate_up)
        self.projs: tuple[QuantLinear, ...] = () if gate_up is not None else (
            linear.make(w.gate_proj), linear.make(w.up_proj))
        self.down_proj = linear.make(w.down_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            return self.down_proj.forward(fused_ops().silu_mul(self.gate_up_proj.forward(x)))
        gate_proj, up_proj = self.projs
        gate = torch.nn.functional.silu(gate_proj.forward(x))
        return self.down_proj.forward(gate * up_proj.forward(x))


class TransformerBlock:
    def __init__(self, arch: LlamaArchConfig, w: LlamaLayerWeights, linear: LinearBackend,
                 attention: AttentionBackend, rotary: RotaryEmbedding,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.eps = arch.rms_norm_eps
        self.input_norm = w.input_layernorm.to(device=device, dtype=dtype)
        self.post_norm = w.post_attention_layernorm.to(device=device, dtype=dtype)
        # Fused kernels and concatenated projections on CUDA; the CPU path stays plain torch.
        self.fused = device.type == "cuda"
        self.attn = Attention(arch, w, linear, attention, rotary, self.fused)
        self.mlp = FeedForward(w, linear, self.fused)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        if not self.fused:
            h = x + self.attn.forward(rms_norm(x, self.input_norm, self.eps), positions,
                                      kv_cache, meta)
            return h + self.mlp.forward(rms_norm(h, self.post_norm, self.eps))
        ops = fused_ops()
        a = self.attn.forward(ops.rms_norm(x, self.input_norm, self.eps), positions, kv_cache,
                              meta)
        h, normed = ops.add_rms_norm(x, a, self.post_norm, self.eps)  # h = x + a
        return h + self.mlp.forward(normed)


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
        if self.device.type == "cuda":
            return fused_ops().rms_norm(x, self.norm, self.arch.rms_norm_eps)
        return rms_norm(x, self.norm, self.arch.rms_norm_eps)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> logits [N, V] float32."""
        return (hidden @ self.lm_head.t()).float()
