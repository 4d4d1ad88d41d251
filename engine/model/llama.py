"""The Llama forward pass over a flat batch of tokens, with pluggable linear and attention.

Modules in the manner of gpt-fast: Attention, FeedForward, TransformerBlock, LlamaModel. The
model owns no KV memory: the runner passes the per-layer caches and the step's metadata
explicitly on every call.

With LoRA on, every projection also has adapter slots (engine/model/lora/): the step's
``LoraBatch`` says which rows use which slot, and the low-rank delta of each row's adapter is
added beside the quantised product (``Projection``); a step without adapter rows passes None
and runs no LoRA kernel.

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
from engine.model.lora.base import LoraBatch, LoraKernels, LoraModelConfig, LoraSite

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


class Projection:
    """A quantised linear and, with LoRA on, its adapter slots: y = base(x) + each adapter
    row's delta. A fused layer's slots keep one delta per sub-projection (``modules``)."""

    def __init__(self, linear: QuantLinear, site: LoraSite | None,
                 kernels: LoraKernels | None) -> None:
        self.linear = linear
        self.site = site
        self.kernels = kernels

    def forward(self, x: torch.Tensor, lora: LoraBatch | None) -> torch.Tensor:
        """x: [T, in] -> [T, out]"""
        y = self.linear.forward(x)
        if lora is not None and self.site is not None:
            assert self.kernels is not None
            self.kernels.add(y, x, self.site, lora)
        return y


class ProjectionFactory:
    """Makes every projection of the model through the linear backend, giving each LoRA slots
    when ``lora`` is set; ``sites`` collects those slots (the adapter slot manager fills them)."""

    def __init__(self, linear: LinearBackend, lora: LoraModelConfig | None,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.linear = linear
        self.lora = lora
        self.dtype = dtype
        self.device = device
        self.sites: list[LoraSite] = []

    def make(self, layer: int, parts: list[tuple[str, GPTQLinearWeights]],
             fused: GPTQLinearWeights | None = None) -> Projection:
        """One projection computing ``parts`` (module name, weights) side by side: ``fused``,
        their output-concatenated layer, or the one part itself."""
        weights = fused if fused is not None else parts[0][1]
        site = None
        if self.lora is not None:
            site = LoraSite(layer, tuple(m for m, _ in parts), weights.in_features,
                            tuple(w.out_features for _, w in parts), self.lora.max_loras,
                            self.lora.max_rank, self.dtype, self.device)
            self.sites.append(site)
        return Projection(self.linear.make(weights), site,
                          None if self.lora is None else self.lora.kernels)


class Attention:
    def __init__(self, arch: LlamaArchConfig, layer: int, w: LlamaLayerWeights,
                 make: ProjectionFactory, attention: AttentionBackend, rotary: RotaryEmbedding,
                 fuse: bool) -> None:
        self.num_heads = arch.num_heads
        self.num_kv_heads = arch.num_kv_heads
        self.head_dim = arch.head_dim
        self.scale = self.head_dim ** -0.5
        self.fused = fuse
        parts = [("q_proj", w.q_proj), ("k_proj", w.k_proj), ("v_proj", w.v_proj)]
        qkv = concat_outputs(w.q_proj.name.rsplit(".", 1)[0] + ".qkv_proj",
                             [p for _, p in parts]) if fuse else None
        self.qkv_proj: Projection | None = None if qkv is None else make.make(layer, parts, qkv)
        self.projs: tuple[Projection, ...] = () if qkv is not None else tuple(
            make.make(layer, [p]) for p in parts)
        self.o_proj = make.make(layer, [("o_proj", w.o_proj)])
        self.attention = attention
        self.rotary = rotary

    def project(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache,
                slot_mapping: torch.Tensor, lora: LoraBatch | None,
                out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [T, hidden] -> q [T, H, D], k and v [T, Hkv, D] (rows may be strided), rotated;
        on the fused path k/v are also in the cache already (``attend`` then writes none).
        ``out`` (fused path only): contiguous q/k/v tensors to return them in (the step
        graphs' buffers)."""
        t = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if self.qkv_proj is not None:
            qkv = self.qkv_proj.forward(x, lora)  # [T, q_size + 2 * kv_size]
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=1)
        else:
            q, k, v = (proj.forward(x, lora) for proj in self.projs)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.fused:  # the rotation and the cache write in one kernel
            fused_ops().rotary_write_kv_(q, k, v, positions, self.rotary.cos, self.rotary.sin,
                                         kv_cache[0], kv_cache[1], slot_mapping, out)
            return (q, k, v) if out is None else out
        if out is not None:
            raise ValueError("q/k/v outputs are a fused (CUDA) path feature")
        return self.rotary.apply(q, positions), self.rotary.apply(k, positions), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
               meta: AttentionMetadata, out: torch.Tensor | None = None) -> torch.Tensor:
        """-> [T, H, D], into ``out`` when given. The only part of the layer whose work
        depends on the sequences' contexts, not just the step's token count."""
        return self.attention.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale,
                                      kv_written=self.fused, out=out)

    def output(self, attn: torch.Tensor, lora: LoraBatch | None) -> torch.Tensor:
        """attn: [T, H, D] -> [T, hidden]"""
        return self.o_proj.forward(attn.reshape(attn.shape[0], -1), lora)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata, lora: LoraBatch | None) -> torch.Tensor:
        q, k, v = self.project(x, positions, kv_cache, meta.slot_mapping, lora)
        return self.output(self.attend(q, k, v, kv_cache, meta), lora)


class FeedForward:
    def __init__(self, layer: int, w: LlamaLayerWeights, make: ProjectionFactory,
                 fuse: bool) -> None:
        parts = [("gate_proj", w.gate_proj), ("up_proj", w.up_proj)]
        gate_up = concat_outputs(w.gate_proj.name.rsplit(".", 1)[0] + ".gate_up_proj",
                                 [p for _, p in parts]) if fuse else None
        self.gate_up_proj: Projection | None = (None if gate_up is None
                                                else make.make(layer, parts, gate_up))
        self.projs: tuple[Projection, ...] = () if gate_up is not None else tuple(
            make.make(layer, [p]) for p in parts)
        self.down_proj = make.make(layer, [("down_proj", w.down_proj)])

    def forward(self, x: torch.Tensor, lora: LoraBatch | None) -> torch.Tensor:
        if self.gate_up_proj is not None:
            return self.down_proj.forward(
                fused_ops().silu_mul(self.gate_up_proj.forward(x, lora)), lora)
        gate_proj, up_proj = self.projs
        gate = torch.nn.functional.silu(gate_proj.forward(x, lora))
        return self.down_proj.forward(gate * up_proj.forward(x, lora), lora)


class TransformerBlock:
    def __init__(self, arch: LlamaArchConfig, layer: int, w: LlamaLayerWeights,
                 make: ProjectionFactory, attention: AttentionBackend, rotary: RotaryEmbedding,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.eps = arch.rms_norm_eps
        self.input_norm = w.input_layernorm.to(device=device, dtype=dtype)
        self.post_norm = w.post_attention_layernorm.to(device=device, dtype=dtype)
        # Fused kernels and concatenated projections on CUDA; the CPU path stays plain torch.
        self.fused = device.type == "cuda"
        self.attn = Attention(arch, layer, w, make, attention, rotary, self.fused)
        self.mlp = FeedForward(layer, w, make, self.fused)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata, lora: LoraBatch | None) -> torch.Tensor:
        h = x + self.attn.forward(rms_norm(x, self.input_norm, self.eps), positions,
                                  kv_cache, meta, lora)
        return h + self.mlp.forward(rms_norm(h, self.post_norm, self.eps), lora)

    def forward_fused(self, x: torch.Tensor, pending: torch.Tensor | None,
                      positions: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata,
                      lora: LoraBatch | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The CUDA path: the layer's output is ``x + pending`` on entry and ``h + mlp`` on
        return, the sums left to the next norm's fused add (one kernel a layer fewer than
        adding, then normalising)."""
        x, q, k, v = self.before_attention(x, pending, positions, kv_cache, meta.slot_mapping,
                                           lora)
        return self.after_attention(x, self.attn.attend(q, k, v, kv_cache, meta), lora)

    # The fused path in two halves around attention (engine/model/step_graphs.py captures
    # each half in CUDA graphs and runs attention between them).

    def before_attention(self, x: torch.Tensor, pending: torch.Tensor | None,
                         positions: torch.Tensor, kv_cache: KVCache, slot_mapping: torch.Tensor,
                         lora: LoraBatch | None,
                         qkv_out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> the residual x (+ pending), and q, k, v (k/v written into the cache; q/k/v in
        ``qkv_out`` when given, see Attention.project)."""
        ops = fused_ops()
        if pending is None:
            normed = ops.rms_norm(x, self.input_norm, self.eps)
        else:
            x, normed = ops.add_rms_norm(x, pending, self.input_norm, self.eps)
        return (x, *self.attn.project(normed, positions, kv_cache, slot_mapping, lora,
                                      qkv_out))

    def after_attention(self, x: torch.Tensor, attn: torch.Tensor, lora: LoraBatch | None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (h, pending): the layer's output is their sum."""
        h, normed = fused_ops().add_rms_norm(x, self.attn.output(attn, lora), self.post_norm,
                                             self.eps)  # h = x + o_proj(attn)
        return h, self.mlp.forward(normed, lora)


class LlamaModel:
    def __init__(self, arch: LlamaArchConfig, weights: LlamaWeights, linear: LinearBackend,
                 attention: AttentionBackend, dtype: torch.dtype, device: torch.device,
                 max_position: int, lora: LoraModelConfig | None = None) -> None:
        self.arch = arch
        self.dtype = dtype
        self.device = device
        self.linear_backend = linear
        self.attention_backend = attention
        self.lora = lora
        rotary = RotaryEmbedding(arch.head_dim, max_position, arch.rope_theta, device)
        self.embed_tokens = weights.embed_tokens.to(device=device, dtype=dtype)  # [V, hidden]
        make = ProjectionFactory(linear, lora, dtype, device)
        self.layers = [TransformerBlock(arch, i, w, make, attention, rotary, dtype, device)
                       for i, w in enumerate(weights.layers)]
        # Every projection's adapter slots (empty without LoRA), for the slot manager.
        self.lora_sites = make.sites
        self.norm = weights.norm.to(device=device, dtype=dtype)
        self.lm_head = weights.lm_head.to(device=device, dtype=dtype)  # [V, hidden]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], meta: AttentionMetadata,
                lora: LoraBatch | None = None) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden] (after the last norm).
        ``lora``: which adapter slot each row uses (None: every row is the base model's)."""
        x = self.embed(input_ids)  # [T, hidden]
        if self.device.type == "cuda":
            pending: torch.Tensor | None = None
            for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
                x, pending = layer.forward_fused(x, pending, positions, kv_cache, meta, lora)
            return self.final_norm(x, pending)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer.forward(x, positions, kv_cache, meta, lora)
        return rms_norm(x, self.norm, self.arch.rms_norm_eps)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [T] -> [T, hidden]"""
        return self.embed_tokens[input_ids]

    def final_norm(self, x: torch.Tensor, pending: torch.Tensor | None) -> torch.Tensor:
        """The fused path's last norm, of ``x + pending`` -> [T, hidden]."""
        ops = fused_ops()
        if pending is None:
            return ops.rms_norm(x, self.norm, self.arch.rms_norm_eps)
        return ops.add_rms_norm(x, pending, self.norm, self.arch.rms_norm_eps)[1]

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> logits [N, V] float32."""
        return (hidden @ self.lm_head.t()).float()
