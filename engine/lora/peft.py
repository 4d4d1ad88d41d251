"""PEFT LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``, from
a folder or a hub repo) -> ``LoraAdapter``, checked against the base model.

What PEFT writes for a Llama model: tensors named
``base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_A.weight`` ([r, in]) and
``...lora_B.weight`` ([out, r]); the delta of a targeted module is
``scale * (x @ A^T) @ B^T`` with ``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
rsLoRA), where ``rank_pattern`` / ``alpha_pattern`` may give single modules their own r and
alpha. Everything else PEFT can save (DoRA magnitudes, LoRA biases, embedding adapters, fully
trained ``modules_to_save``) changes more than a low-rank delta on the seven projections and is
refused with a message naming it, as are ranks over the server's limit, modules the model does
not have, and shapes that do not match the base.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from engine.checkpoint.hub import resolve_checkpoint
from engine.checkpoint.types import CheckpointError, LlamaArchConfig
from engine.lora.spec import TARGET_MODULES, LoraError, LoraSpec

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"
HUB_PATTERNS = (CONFIG_FILE, SAFETENSORS_FILE, BIN_FILE)
_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\."
                  r"(\w+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
_BLOCK_OF = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
             "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


@dataclass(frozen=True)
class LoraModuleWeights:
    """One targeted projection: ``delta(x) = (x @ a^T) @ b^T`` with the scale folded into b."""

    a: torch.Tensor  # [r, in_features] float32
    b: torch.Tensor  # [out_features, r] float32, times the module's scale
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True)
class LoraAdapter:
    """A loaded adapter on the host. ``digest`` identifies its weights and config: it is part of
    the prefix cache's key, so reloading a name with other weights shares no K/V."""

    spec: LoraSpec
    path: str  # the local folder read
    rank: int  # the largest rank of any module
    target_modules: tuple[str, ...]  # among TARGET_MODULES, in their order
    modules: dict[tuple[int, str], LoraModuleWeights]  # (layer, module) -> weights
    digest: str

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def nbytes(self) -> int:
        return sum(w.a.numel() + w.b.numel() for w in self.modules.values()) * 4


def module_shapes(arch: LlamaArchConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each projection."""
    h, inter = arch.hidden_size, arch.intermediate_size
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


def load_adapter(spec: LoraSpec, arch: LlamaArchConfig, max_rank: int, *,
                 download_dir: str | None = None, offline: bool = False) -> LoraAdapter:
    """Resolve, read and check one adapter; raises LoraError naming the adapter and problem."""
    where = f"LoRA adapter '{spec.name}' ({spec.describe()})"
    try:
        folder = resolve_checkpoint(spec.source, spec.revision, download_dir=download_dir,
                                    offline=offline, allow_patterns=HUB_PATTERNS)
    except CheckpointError as e:
        raise LoraError(f"{where}: {e}") from e
    try:
        return _load_folder(spec, folder, arch, max_rank)
    except LoraError as e:
        raise LoraError(f"{where}: {e}") from e


def _load_folder(spec: LoraSpec, folder: Path, arch: LlamaArchConfig,
                 max_rank: int) -> LoraAdapter:
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise LoraError(f"{config_path}: file not found (not a PEFT adapter folder)")
    config_bytes = config_path.read_bytes()
    config = _parse_config(config_path, config_bytes)
    weights_path, tensors = _read_weights(folder)
    shapes = module_shapes(arch)
    pairs = _pair_tensors(tensors, arch.num_layers)
    if not pairs:
        raise LoraError(f"{weights_path}: no lora_A/lora_B tensors of a decoder layer")
    modules: dict[tuple[int, str], LoraModuleWeights] = {}
    for (layer, module), (a, b) in sorted(pairs.items(), key=lambda kv: (
            kv[0][0], TARGET_MODULES.index(kv[0][1]))):
        key = f"model.layers.{layer}.{_BLOCK_OF[module]}.{module}"
        in_f, out_f = shapes[module]
        r = pattern_value(config.rank_pattern, key, config.r)
        alpha = float(pattern_value(config.alpha_pattern, key, config.lora_alpha))
        if a.shape[0] > max_rank:
            raise LoraError(f"{key} has rank {a.shape[0]}, over the server's max_lora_rank "
                            f"{max_rank} (raise --max-lora-rank)")
        for what, t, want in (("lora_A", a, (r, in_f)), ("lora_B", b, (out_f, r))):
            if tuple(t.shape) != want:
                raise LoraError(f"{key}.{what} has shape {tuple(t.shape)}, expected {want} "
                                f"(rank {r}; the base model's {module} is {in_f} -> {out_f})")
        scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        modules[layer, module] = LoraModuleWeights(
            a=a.float().contiguous(), b=(b.float() * scale).contiguous(), scale=scale)
    digest = hashlib.sha256(config_bytes + weights_path.read_bytes()).hexdigest()[:16]
    targets = tuple(m for m in TARGET_MODULES if any(k[1] == m for k in modules))
    return LoraAdapter(spec=spec, path=str(folder), rank=max(w.rank for w in modules.values()),
                       target_modules=targets, modules=modules, digest=digest)


@dataclass(frozen=True)
class _Config:
    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]


def _parse_config(path: Path, raw: bytes) -> _Config:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise LoraError(f"{path}: expected a JSON object")
    peft_type = data.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise LoraError(f"{path}: peft_type is {peft_type!r}; only LORA adapters are served")
    r = data.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise LoraError(f"{path}: 'r' must be a positive integer, got {r!r}")
    alpha = data.get("lora_alpha", 8)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise LoraError(f"{path}: 'lora_alpha' must be a number, got {alpha!r}")
    for flag in ("use_dora", "use_rslora"):
        if not isinstance(data.get(flag, False), bool):
            raise LoraError(f"{path}: {flag!r} must be true or false")
    if data.get("use_dora"):
        raise LoraError(f"{path}: DoRA adapters (use_dora) are not supported")
    if data.get("bias", "none") != "none":
        raise LoraError(f"{path}: bias={data.get('bias')!r} trains biases the base model does "
                        "not have; only bias='none' is supported")
    if data.get("modules_to_save"):
        raise LoraError(f"{path}: modules_to_save {data['modules_to_save']!r} replaces whole "
                        "layers of the base model; not supported")
    targets = data.get("target_modules")
    if isinstance(targets, list):
        unknown = [t for t in targets if t not in TARGET_MODULES]
        if unknown:
            raise LoraError(f"{path}: target modules {', '.join(map(str, unknown))} are not "
                            f"linear layers of this model ({', '.join(TARGET_MODULES)})")
    patterns = {}
    for field in ("rank_pattern", "alpha_pattern"):
        value = data.get(field) or {}
        if not isinstance(value, dict) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in value.values()):
            raise LoraError(f"{path}: {field!r} must map module names to numbers")
        patterns[field] = value
    if any(not isinstance(v, int) or v < 1 for v in patterns["rank_pattern"].values()):
        raise LoraError(f"{path}: 'rank_pattern' ranks must be positive integers")
    return _Config(r=r, lora_alpha=float(alpha), use_rslora=bool(data.get("use_rslora")),
                   rank_pattern=patterns["rank_pattern"],
                   alpha_pattern=patterns["alpha_pattern"])


def pattern_value(patterns: dict, key: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: the first pattern that matches the end of
    the module's name at a dot boundary (a regex, as PEFT reads it)."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?({pattern})", key):
            return value
    return default


def _read_weights(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    path = folder / SAFETENSORS_FILE
    if path.is_file():
        try:
            return path, load_file(str(path))
        except (OSError, SafetensorError) as e:
            raise LoraError(f"{path}: not a readable safetensors file ({e})") from e
    path = folder / BIN_FILE
    if path.is_file():
        try:
            # weights_only: a .bin is a pickle, and a pickle can run code; tensors only.
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several unrelated types for a bad pickle
            raise LoraError(f"{path}: not a readable PyTorch weights file ({e})") from e
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor)
                                                   for v in loaded.values()):
            raise LoraError(f"{path}: expected a mapping of tensor names to tensors")
        return path, loaded
    raise LoraError(f"{folder}: no weights file ({SAFETENSORS_FILE} or {BIN_FILE})")


def _pair_tensors(tensors: dict[str, torch.Tensor], num_layers: int
                  ) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = _KEY.match(name)
        if m is None:
            raise LoraError(f"tensor {name} is not a lora_A/lora_B weight of a decoder layer's "
                            f"projection ({', '.join(TARGET_MODULES)}); such adapters are not "
                            "supported")
        layer, block, module, half = int(m[1]), m[2], m[3], m[4]
        if module not in _BLOCK_OF or _BLOCK_OF[module] != block:
            raise LoraError(f"tensor {name}: target module {block}.{module} is not a linear "
                            f"layer of this model ({', '.join(TARGET_MODULES)})")
        if layer >= num_layers:
            raise LoraError(f"tensor {name}: layer {layer} does not exist (the base model has "
                            f"{num_layers})")
        if not t.is_floating_point() or t.dim() != 2:
            raise LoraError(f"tensor {name} must be a 2-D floating-point matrix, got "
                            f"{t.dtype} {tuple(t.shape)}")
        halves.setdefault((layer, module), {})[half] = t
    pairs = {}
    for (layer, module), h in halves.items():
        if set(h) != {"A", "B"}:
            missing = "lora_B" if "A" in h else "lora_A"
            raise LoraError(f"model.layers.{layer}.{_BLOCK_OF[module]}.{module}: {missing} "
                            "is missing")
        pairs[layer, module] = (h["A"], h["B"])
    return pairs
