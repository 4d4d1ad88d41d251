"""Synthetic LoRA adapters in PEFT's on-disk format, for tests, the demo and benchmarks.

Written without PEFT (the GPU image has none), in exactly the layout ``save_pretrained`` uses;
the tests load these folders with PEFT itself, which proves the format. A is drawn with std
1/sqrt(in) (so x @ A^T is O(1) for normalised activations) and B with ``b_std``: unlike a
freshly initialised PEFT adapter (B = 0), every module changes the model's output.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.checkpoint.arch import read_arch_config
from engine.lora.peft import BIN_FILE, CONFIG_FILE, SAFETENSORS_FILE, module_shapes, pattern_value
from engine.lora.spec import TARGET_MODULES

_BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
          "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


@dataclass(frozen=True)
class AdapterSpec:
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = TARGET_MODULES
    use_rslora: bool = False
    seed: int = 0
    b_std: float = 0.05
    dtype: torch.dtype = torch.float16
    # Per-module ranks, as PEFT's rank_pattern ({module name pattern: rank}).
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    safetensors: bool = True  # False: adapter_model.bin, as save_pretrained(safe_serialization=False)


def write_adapter(base: Path, out: Path, spec: AdapterSpec) -> Path:
    """Write an adapter for the checkpoint at ``base`` into ``out``; returns ``out``."""
    arch = read_arch_config(base)
    shapes = module_shapes(arch)
    gen = torch.Generator().manual_seed(spec.seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(arch.num_layers):
        for module in spec.target_modules:
            key = f"model.layers.{layer}.{_BLOCK[module]}.{module}"
            rank = int(pattern_value(spec.rank_pattern, key, spec.rank))
            in_f, out_f = shapes[module]
            a = torch.randn(rank, in_f, generator=gen) / in_f ** 0.5  # [r, in]
            b = torch.randn(out_f, rank, generator=gen) * spec.b_std  # [out, r]
            tensors[f"base_model.model.{key}.lora_A.weight"] = a.to(spec.dtype).contiguous()
            tensors[f"base_model.model.{key}.lora_B.weight"] = b.to(spec.dtype).contiguous()
    out.mkdir(parents=True, exist_ok=True)
    if spec.safetensors:
        save_file(tensors, str(out / SAFETENSORS_FILE), metadata={"format": "pt"})
    else:
        torch.save(tensors, out / BIN_FILE)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base),
        "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": list(spec.target_modules), "use_rslora": spec.use_rslora,
        "use_dora": False, "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
        "rank_pattern": dict(spec.rank_pattern), "alpha_pattern": dict(spec.alpha_pattern),
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out
