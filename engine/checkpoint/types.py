"""Weight containers produced by the loader and the synthesiser, consumed by the model.

Shapes follow the GPTQ on-disk format of TheBloke's repos (AutoGPTQ "gptq" packing):
    qweight: int32 [in_features * bits / 32, out_features]  values packed along the input dim
    qzeros:  int32 [num_groups, out_features * bits / 32]   packed along the output dim, stored
                                                             minus one: w = scale * (q - (z + 1))
    scales:  fp16  [num_groups, out_features]
    g_idx:   int32 [in_features]                              group of each input row
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class CheckpointError(ValueError):
    """A checkpoint cannot be used. The message names the file or tensor and what was expected."""


@dataclass(frozen=True)
class QuantConfig:
    bits: int  # 4 or 8
    group_size: int | None  # None: one group over the whole input dim (-1 on disk)
    desc_act: bool  # act-order: g_idx is a permutation-like, non-monotone map
    sym: bool

    def num_groups(self, in_features: int) -> int:
        return 1 if self.group_size is None else -(-in_features // self.group_size)


@dataclass(frozen=True)
class LlamaArchConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    bos_token_id: int | None
    eos_token_id: int
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class GPTQLinearWeights:
    """One quantised linear layer, exactly as stored. ``bias`` is None for Llama."""

    name: str  # e.g. "model.layers.0.self_attn.q_proj" (for error messages and logs)
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor | None  # None when the checkpoint omits it (no act-order)
    bits: int
    group_size: int | None
    in_features: int
    out_features: int
    bias: torch.Tensor | None = None


@dataclass
class LlamaLayerWeights:
    input_layernorm: torch.Tensor  # [hidden]
    q_proj: GPTQLinearWeights
    k_proj: GPTQLinearWeights
    v_proj: GPTQLinearWeights
    o_proj: GPTQLinearWeights
    post_attention_layernorm: torch.Tensor  # [hidden]
    gate_proj: GPTQLinearWeights
    up_proj: GPTQLinearWeights
    down_proj: GPTQLinearWeights


@dataclass
class LlamaWeights:
    embed_tokens: torch.Tensor  # [vocab, hidden] fp16
    layers: list[LlamaLayerWeights]
    norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor  # [vocab, hidden] fp16 (not quantised in GPTQ repos)


@dataclass
class LoadedCheckpoint:
    path: str  # local folder the files were read from
    arch: LlamaArchConfig
    quant: QuantConfig
    weights: LlamaWeights
    # Written by `gptq-serve synth` (engine/checkpoint/marker.py): its text is gibberish.
    random_weights: bool = False
