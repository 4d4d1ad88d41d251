"""Synthetic GPTQ checkpoints in exactly the on-disk format of TheBloke/Llama-2-13B-GPTQ.

Random but well-conditioned weights: each linear layer is drawn in floating point with std
0.3 / sqrt(fan_in) (1.2 / sqrt(fan_in) for q and k, see QK_STD), then quantised properly
(per-group scale from the group's range, round to nearest), so the stored integers look like
real GPTQ output rather than uniform noise and the forward pass stays numerically tame through
every layer: attention is neither one-hot nor flat, so two correct implementations agree to float
rounding. Embeddings have std 1 / sqrt(hidden) (as trained Llama 2 embeddings roughly do), so
each layer's output matters next to the residual.

Deterministic for a given spec on a given device type (CPU and CUDA random streams differ).
The "13b" preset is written layer by layer through a streaming safetensors writer, so host
memory stays at about one layer whatever the model size; on a GPU (``device="cuda"``) the
weights are generated and quantised there.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.checkpoint.arch import (
    CONFIG_FILE,
    QUANTIZE_CONFIG_FILE,
    QuantFileInfo,
    arch_to_config_json,
    quant_to_json,
    write_json,
)
from engine.checkpoint.dequant import act_order_g_idx, default_g_idx, quantize_gptq
from engine.checkpoint.marker import write_synth_marker
from engine.checkpoint.safetensors_stream import SafetensorsStreamWriter, TensorSpec
from engine.checkpoint.synth_tokenizer import train_tokenizer
from engine.checkpoint.types import LlamaArchConfig, QuantConfig

WEIGHTS_FILE = "model.safetensors"
PRESETS = ("tiny", "13b")
# The tokenizer's size per preset: tiny keeps the tests fast; 13b has Llama 2's 32000, so the
# lm_head and the sampler of a benchmark do the real model's work.
TOKENIZER_VOCAB_SIZES = {"tiny": 1000, "13b": 32000}
LINEAR_STD = 0.3  # times 1 / sqrt(fan_in)
# q and k entries of std c give attention logits of std c^2 (whatever head_dim, after the
# 1/sqrt(head_dim) scaling): 0.3 would make attention nearly uniform, hiding position bugs;
# 1.2 gives logits of std ~1.4, attention peaked yet far from one-hot.
QK_STD = 1.2
LM_HEAD_STD = 2.0  # times 1 / sqrt(hidden): logits of std ~2, a peaked but not one-hot softmax
NORM_JITTER = 0.05

# (module path inside a layer, which linear): in the order AutoGPTQ quantises them.
LAYER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class SynthSpec:
    preset: str  # "tiny" | "13b"
    bits: int  # 4 | 8
    group_size: int | None  # None: one group over the whole input dim
    act_order: bool
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or None, got {self.group_size}")

    @property
    def quant(self) -> QuantConfig:
        return QuantConfig(bits=self.bits, group_size=self.group_size, desc_act=self.act_order,
                           sym=True)


def preset_arch(preset: str, tokenizer_vocab_size: int) -> LlamaArchConfig:
    """The preset's shapes. "tiny" runs a forward in milliseconds on a CPU yet takes every group
    size (32, 64 and 128 divide 256 and 768); "13b" is Llama-2-13B's shapes, its tokenizer
    Llama 2's size (32000)."""
    if preset == "tiny":
        shapes = (256, 768, 2, 4, tokenizer_vocab_size, 2048)
    elif preset == "13b":
        shapes = (5120, 13824, 40, 40, 32000, 4096)
    else:
        raise ValueError(f"unknown preset {preset!r}")
    hidden, intermediate, layers, heads, vocab, context = shapes
    return LlamaArchConfig(hidden_size=hidden, intermediate_size=intermediate, num_layers=layers,
                           num_heads=heads, num_kv_heads=heads, vocab_size=vocab,
                           max_position_embeddings=context, rms_norm_eps=1e-5,
                           rope_theta=10000.0, bos_token_id=1, eos_token_id=2)


def linear_shapes(arch: LlamaArchConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear in a layer."""
    h, i = arch.hidden_size, arch.intermediate_size
    q_out, kv_out = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    return {"self_attn.q_proj": (h, q_out), "self_attn.k_proj": (h, kv_out),
            "self_attn.v_proj": (h, kv_out), "self_attn.o_proj": (q_out, h),
            "mlp.gate_proj": (h, i), "mlp.up_proj": (h, i), "mlp.down_proj": (i, h)}


def tensor_plan(arch: LlamaArchConfig, quant: QuantConfig) -> list[TensorSpec]:
    """Every tensor of model.safetensors, in the order the synthesiser writes them."""
    h, v, bits = arch.hidden_size, arch.vocab_size, quant.bits
    plan = [TensorSpec("model.embed_tokens.weight", torch.float16, (v, h))]
    for n in range(arch.num_layers):
        prefix = f"model.layers.{n}"
        plan.append(TensorSpec(f"{prefix}.input_layernorm.weight", torch.float16, (h,)))
        for module, (fan_in, fan_out) in linear_shapes(arch).items():
            groups = quant.num_groups(fan_in)
            name = f"{prefix}.{module}"
            plan += [TensorSpec(f"{name}.qweight", torch.int32, (fan_in * bits // 32, fan_out)),
                     TensorSpec(f"{name}.qzeros", torch.int32, (groups, fan_out * bits // 32)),
                     TensorSpec(f"{name}.scales", torch.float16, (groups, fan_out)),
                     TensorSpec(f"{name}.g_idx", torch.int32, (fan_in,))]
        plan.append(TensorSpec(f"{prefix}.post_attention_layernorm.weight", torch.float16, (h,)))
    plan += [TensorSpec("model.norm.weight", torch.float16, (h,)),
             TensorSpec("lm_head.weight", torch.float16, (v, h))]
    return plan


class _Sampler:
    """The seeded random source; one per checkpoint, consumed in file order."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.device = device
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def normal(self, shape: tuple[int, ...], std: float) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen, device=self.device) * std

    def norm_weight(self, size: int) -> torch.Tensor:
        return (1.0 + self.normal((size,), NORM_JITTER)).half()

    def g_idx(self, in_features: int, quant: QuantConfig) -> torch.Tensor:
        if not quant.desc_act:
            return default_g_idx(in_features, quant.group_size, self.device)
        # Act-order quantises rows by descending activation size, a data-dependent order:
        # a random permutation stands in for it.
        perm = torch.randperm(in_features, generator=self.gen, device=self.device)
        return act_order_g_idx(perm, quant.group_size)


def draw_weights(arch: LlamaArchConfig, quant: QuantConfig, seed: int,
                 device: torch.device) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """The float weights before quantisation, in file order: (name, tensor, None) for tensors
    stored as they are (fp16), (linear name, float weight [out, in], g_idx [in]) for each linear
    layer to quantise. One layer's worth is alive at a time."""
    rng = _Sampler(seed, device)
    h = arch.hidden_size
    embed = rng.normal((arch.vocab_size, h), 1 / math.sqrt(h)).half()  # [V, hidden]
    yield "model.embed_tokens.weight", embed, None
    del embed
    for n in range(arch.num_layers):
        prefix = f"model.layers.{n}"
        yield f"{prefix}.input_layernorm.weight", rng.norm_weight(h), None
        for module, (fan_in, fan_out) in linear_shapes(arch).items():
            std = QK_STD if module in ("self_attn.q_proj", "self_attn.k_proj") else LINEAR_STD
            weight = rng.normal((fan_out, fan_in), std / math.sqrt(fan_in))  # [out, in]
            yield f"{prefix}.{module}", weight, rng.g_idx(fan_in, quant)
        yield f"{prefix}.post_attention_layernorm.weight", rng.norm_weight(h), None
    yield "model.norm.weight", rng.norm_weight(h), None
    lm_head = rng.normal((arch.vocab_size, h), LM_HEAD_STD / math.sqrt(h)).half()  # [V, hidden]
    yield "lm_head.weight", lm_head, None


def generate_tensors(arch: LlamaArchConfig, quant: QuantConfig, seed: int,
                     device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, stored tensor) in ``tensor_plan`` order."""
    for name, tensor, g_idx in draw_weights(arch, quant, seed, device):
        if g_idx is None:
            yield name, tensor
            continue
        q = quantize_gptq(tensor, quant.bits, quant.group_size, g_idx, name)
        del tensor
        yield f"{name}.qweight", q.qweight
        yield f"{name}.qzeros", q.qzeros
        yield f"{name}.scales", q.scales
        yield f"{name}.g_idx", g_idx.to(torch.int32)


def _check_divisible(arch: LlamaArchConfig, quant: QuantConfig) -> None:
    if quant.group_size is None:
        return
    for module, (fan_in, _) in linear_shapes(arch).items():
        if fan_in % quant.group_size:
            raise ValueError(f"group_size {quant.group_size} does not divide {module}'s "
                             f"in_features {fan_in}")


def synthesize(spec: SynthSpec, out_dir: Path) -> None:
    """Write a complete checkpoint folder. config.json is written last, so a folder that has it
    is complete (an interrupted run leaves no loadable half-checkpoint)."""
    # sentencepiece trains exactly this many pieces or fails, so the size is known up front.
    vocab_size = TOKENIZER_VOCAB_SIZES[spec.preset]
    arch = preset_arch(spec.preset, vocab_size)
    quant = spec.quant
    _check_divisible(arch, quant)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).unlink(missing_ok=True)
    train_tokenizer(out_dir, vocab_size, model_max_length=arch.max_position_embeddings)
    device = torch.device(spec.device)

    partial = out_dir / (WEIGHTS_FILE + ".partial")
    with torch.no_grad(), SafetensorsStreamWriter(partial, tensor_plan(arch, quant),
                                                  {"format": "pt"}) as writer:
        for name, tensor in generate_tensors(arch, quant, spec.seed, device):
            writer.write(name, tensor)
    partial.replace(out_dir / WEIGHTS_FILE)

    info = QuantFileInfo()
    write_json(out_dir / QUANTIZE_CONFIG_FILE, quant_to_json(quant, info, with_method=False))
    write_json(out_dir / "generation_config.json", {
        "_from_model_config": True, "bos_token_id": arch.bos_token_id,
        "eos_token_id": arch.eos_token_id, "pad_token_id": 0,
        "transformers_version": "4.32.0.dev0"})
    write_synth_marker(out_dir, {"preset": spec.preset, "bits": spec.bits,
                                 "group_size": spec.group_size, "act_order": spec.act_order,
                                 "seed": spec.seed})
    config = arch_to_config_json(arch, quant_to_json(quant, info, with_method=True),
                                 f"synthetic/llama-2-{spec.preset}")
    write_json(out_dir / CONFIG_FILE, config)


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=PRESETS, default="tiny",
                   help="model shapes: tiny (CPU tests, demo) or 13b (Llama-2-13B, GPU work)")
    p.add_argument("--bits", type=int, choices=(4, 8), default=4)
    p.add_argument("--group-size", type=int, default=128,
                   help="rows per quantisation group; -1 or 0 for one group (no grouping)")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=False,
                   help="act-order (desc_act): non-monotone g_idx")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu",
                   help="where weights are generated and quantised (cuda is much faster for 13b)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")


def run(args: argparse.Namespace) -> int:
    group = None if args.group_size in (-1, 0) else args.group_size
    try:
        spec = SynthSpec(preset=args.preset, bits=args.bits, group_size=group,
                         act_order=args.act_order, seed=args.seed, device=args.device)
        if spec.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no CUDA GPU is visible")
        synthesize(spec, args.out)
    except ValueError as e:
        print(f"gptq-serve synth: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({spec.preset}, {spec.bits}-bit, group "
          f"{spec.group_size or 'none'}, act-order {'on' if spec.act_order else 'off'}; "
          "random weights: its text is gibberish)")
    return 0

