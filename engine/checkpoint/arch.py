"""Readers (and, for the synthesiser, writers) of config.json and quantize_config.json.

Only what the engine can run is accepted: a Llama architecture (LlamaForCausalLM, SiLU MLP, plain
RoPE) quantised with GPTQ at 4 or 8 bits in the AutoGPTQ "gptq" packing (zeros stored minus one).
Everything else is refused here with a message naming the file and the field, so the rest of the
engine can take these two configs as valid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine.checkpoint.types import CheckpointError, LlamaArchConfig, QuantConfig

CONFIG_FILE = "config.json"
QUANTIZE_CONFIG_FILE = "quantize_config.json"
SUPPORTED_BITS = (4, 8)


@dataclass(frozen=True)
class QuantFileInfo:
    """Fields of a GPTQ quantisation block the engine does not run on, kept for writing."""

    damp_percent: float = 0.01
    true_sequential: bool = True
    model_name_or_path: str | None = None
    model_file_base_name: str = "model"


def read_json(path: Path) -> dict[str, object]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


_MISSING = object()


def write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _get(source: Path, data: dict[str, object], key: str, default: object) -> object:
    value = data.get(key)
    if value is None:
        if default is _MISSING:
            raise CheckpointError(f"{source}: missing required field {key!r}")
        return default
    return value


def _int(source: Path, data: dict[str, object], key: str, default: object = _MISSING) -> int:
    value = _get(source, data, key, default)
    # bool is an int in Python; true where a size is expected is a broken file.
    if not isinstance(value, int) or isinstance(value, bool):
        raise CheckpointError(f"{source}: field {key!r} must be an integer, got {value!r}")
    return value


def _float(source: Path, data: dict[str, object], key: str, default: object = _MISSING) -> float:
    value = _get(source, data, key, default)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise CheckpointError(f"{source}: field {key!r} must be a number, got {value!r}")
    return float(value)


def _bool(source: Path, data: dict[str, object], key: str, default: bool) -> bool:
    value = _get(source, data, key, default)
    if not isinstance(value, bool):
        raise CheckpointError(f"{source}: field {key!r} must be true or false, got {value!r}")
    return value


def parse_arch_config(data: dict[str, object], source: Path) -> LlamaArchConfig:
    model_type = data.get("model_type")
    archs = data.get("architectures") or []
    if model_type != "llama" or not isinstance(archs, list) or "LlamaForCausalLM" not in archs:
        raise CheckpointError(
            f"{source}: expected a Llama model (model_type 'llama', architectures "
            f"['LlamaForCausalLM']), got model_type {model_type!r}, architectures {archs!r}")
    act = data.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{source}: hidden_act must be 'silu' for Llama, got {act!r}")
    if data.get("rope_scaling") is not None:
        raise CheckpointError(f"{source}: rope_scaling {data['rope_scaling']!r} is not "
                              "supported; only plain RoPE (rope_scaling null)")
    hidden = _int(source, data, "hidden_size")
    heads = _int(source, data, "num_attention_heads")
    kv_heads = _int(source, data, "num_key_value_heads", heads)
    if hidden % heads or heads % kv_heads:
        raise CheckpointError(f"{source}: hidden_size {hidden} must divide into "
                              f"num_attention_heads {heads}, and those into "
                              f"num_key_value_heads {kv_heads}")
    head_dim = data.get("head_dim")
    if head_dim is not None and head_dim != hidden // heads:
        raise CheckpointError(f"{source}: head_dim {head_dim} must equal hidden_size / "
                              f"num_attention_heads = {hidden // heads}")
    eos = data.get("eos_token_id", 2)
    # Some configs list several end tokens; the first is the one the tokenizer appends.
    if isinstance(eos, list) and eos:
        eos = eos[0]
    if not isinstance(eos, int) or isinstance(eos, bool):
        raise CheckpointError(f"{source}: eos_token_id must be an int, got {eos!r}")
    bos = data.get("bos_token_id")
    return LlamaArchConfig(
        hidden_size=hidden,
        intermediate_size=_int(source, data, "intermediate_size"),
        num_layers=_int(source, data, "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        vocab_size=_int(source, data, "vocab_size"),
        max_position_embeddings=_int(source, data, "max_position_embeddings", 4096),
        rms_norm_eps=_float(source, data, "rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(data, source),
        bos_token_id=bos if isinstance(bos, int) and not isinstance(bos, bool) else None,
        eos_token_id=eos,
        tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
    )


def _rope_theta(data: dict[str, object], source: Path) -> float:
    # Llama 2's config.json predates the field (10000 implied); newer writers nest it.
    params = data.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        if params.get("rope_type", "default") != "default":
            raise CheckpointError(f"{source}: rope_type {params['rope_type']!r} is not "
                                  "supported; only default RoPE")
        return float(params["rope_theta"])
    return _float(source, data, "rope_theta", 10000.0)


def parse_quant_config(data: dict[str, object], source: Path) -> QuantConfig:
    method = data.get("quant_method", "gptq")
    if method != "gptq":
        raise CheckpointError(f"{source}: quant_method must be 'gptq', got {method!r}")
    # gptq_v2 stores zeros without the minus-one offset; reading it as v1 would be silently wrong.
    fmt = data.get("checkpoint_format", data.get("format", "gptq"))
    if fmt != "gptq":
        raise CheckpointError(f"{source}: checkpoint_format must be 'gptq', got {fmt!r}")
    bits = _int(source, data, "bits")
    if bits not in SUPPORTED_BITS:
        raise CheckpointError(f"{source}: bits must be 4 or 8, got {bits!r} "
                              f"({bits}-bit GPTQ is not supported)")
    group = _int(source, data, "group_size", -1)
    if group == -1:
        group_size = None
    elif group > 0:
        group_size = group
    else:
        raise CheckpointError(f"{source}: group_size must be positive or -1 (no grouping), "
                              f"got {group!r}")
    return QuantConfig(
        bits=bits,
        group_size=group_size,
        desc_act=_bool(source, data, "desc_act", False),
        sym=_bool(source, data, "sym", True),
    )


def read_arch_config(folder: Path) -> LlamaArchConfig:
    path = folder / CONFIG_FILE
    return parse_arch_config(read_json(path), path)


def read_quant_config(folder: Path) -> QuantConfig:
    """quantize_config.json (AutoGPTQ) or else config.json's quantization_config (transformers).
    When both are present they must agree, or which one the weights follow is unknowable."""
    qpath, cpath = folder / QUANTIZE_CONFIG_FILE, folder / CONFIG_FILE
    embedded = read_json(cpath).get("quantization_config") if cpath.is_file() else None
    if embedded is not None and not isinstance(embedded, dict):
        raise CheckpointError(f"{cpath}: quantization_config must be an object")
    from_config = None if embedded is None else parse_quant_config(
        embedded, Path(f"{cpath} (quantization_config)"))
    if not qpath.is_file():
        if from_config is None:
            raise CheckpointError(f"{qpath}: file not found, and {cpath} has no "
                                  "quantization_config; a GPTQ checkpoint needs one of them")
        return from_config
    quant = parse_quant_config(read_json(qpath), qpath)
    if from_config is not None and from_config != quant:
        raise CheckpointError(f"{qpath} says {quant} but {cpath}'s quantization_config says "
                              f"{from_config}; they must agree")
    return quant


def arch_to_config_json(arch: LlamaArchConfig, quant_block: dict[str, object] | None,
                        name_or_path: str) -> dict[str, object]:
    """config.json as TheBloke's Llama 2 GPTQ repos have it (fp16 model, GPTQ block inside)."""
    config: dict[str, object] = {
        "_name_or_path": name_or_path,
        "architectures": ["LlamaForCausalLM"],
        "bos_token_id": arch.bos_token_id,
        "eos_token_id": arch.eos_token_id,
        "hidden_act": "silu",
        "hidden_size": arch.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": arch.intermediate_size,
        "max_position_embeddings": arch.max_position_embeddings,
        "model_type": "llama",
        "num_attention_heads": arch.num_heads,
        "num_hidden_layers": arch.num_layers,
        "num_key_value_heads": arch.num_kv_heads,
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "rms_norm_eps": arch.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": arch.rope_theta,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "torch_dtype": "float16",
        "transformers_version": "4.32.0.dev0",
        "use_cache": True,
        "vocab_size": arch.vocab_size,
    }
    if quant_block is not None:
        config["quantization_config"] = quant_block
    return config


def quant_to_json(quant: QuantConfig, info: QuantFileInfo,
                  with_method: bool) -> dict[str, object]:
    """quantize_config.json's fields in AutoGPTQ's order; ``with_method`` adds quant_method, as
    the copy embedded in config.json carries it."""
    block: dict[str, object] = {
        "bits": quant.bits,
        "group_size": -1 if quant.group_size is None else quant.group_size,
        "damp_percent": info.damp_percent,
        "desc_act": quant.desc_act,
        "sym": quant.sym,
        "true_sequential": info.true_sequential,
        "model_name_or_path": info.model_name_or_path,
        "model_file_base_name": info.model_file_base_name,
    }
    if with_method:
        block["quant_method"] = "gptq"
    return block
