"""The ground truth for correctness tests: transformers' LlamaForCausalLM, in float32, on the
checkpoint's dequantised weights. Nobody here wrote it, so agreeing with it means something."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine.checkpoint.dequant import dequantize
from engine.checkpoint.types import LlamaArchConfig, LoadedCheckpoint

_LINEARS = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
            ("mlp", ("gate_proj", "up_proj", "down_proj")))


def reference_config(arch: LlamaArchConfig) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size, num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads, num_key_value_heads=arch.num_kv_heads,
        max_position_embeddings=arch.max_position_embeddings, rms_norm_eps=arch.rms_norm_eps,
        rope_theta=arch.rope_theta, hidden_act="silu", attention_bias=False, mlp_bias=False,
        bos_token_id=arch.bos_token_id, eos_token_id=arch.eos_token_id, pad_token_id=None,
        tie_word_embeddings=False, torch_dtype=torch.float32)


def reference_state_dict(ckpt: LoadedCheckpoint) -> dict[str, torch.Tensor]:
    w = ckpt.weights
    state = {"model.embed_tokens.weight": w.embed_tokens, "model.norm.weight": w.norm,
             "lm_head.weight": w.lm_head}
    for n, layer in enumerate(w.layers):
        p = f"model.layers.{n}"
        state[f"{p}.input_layernorm.weight"] = layer.input_layernorm
        state[f"{p}.post_attention_layernorm.weight"] = layer.post_attention_layernorm
        for block, names in _LINEARS:
            for name in names:
                state[f"{p}.{block}.{name}.weight"] = dequantize(getattr(layer, name))
    return {k: v.float().contiguous() for k, v in state.items()}


def reference_model(ckpt: LoadedCheckpoint) -> LlamaForCausalLM:
    """LlamaForCausalLM in float32, eval mode, eager attention, on the CPU."""
    config = reference_config(ckpt.arch)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(reference_state_dict(ckpt), strict=False)
    # Non-persistent buffers (rotary inv_freq) are not in the state dict; weights must all be.
    assert not unexpected and not [m for m in missing if m.endswith("weight")], (missing,
                                                                               unexpected)
    return model.eval()
