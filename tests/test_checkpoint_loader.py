"""The loader: what it accepts (file names, shards, config variants) and every way a checkpoint
can be refused, each with a message naming the file or tensor and what was expected."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.checkpoint.loader import load_checkpoint, load_from_tensors
from engine.checkpoint.types import CheckpointError, LlamaArchConfig, QuantConfig
from tests.reference import reference_model

Q_PROJ = "model.layers.0.self_attn.q_proj"
TINY_QUANT = QuantConfig(bits=4, group_size=32, desc_act=True, sym=True)


@pytest.fixture(scope="module")
def tiny_tensors(tiny_checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_checkpoint / "model.safetensors"))


@pytest.fixture(scope="module")
def tiny_arch(tiny_checkpoint: Path) -> LlamaArchConfig:
    return load_checkpoint(str(tiny_checkpoint), None).arch


@pytest.fixture
def folder(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint that a test may break."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


def edit_json(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def refused(folder: Path, *fragments: str) -> None:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(folder), None, offline=True)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


# --- what is accepted -------------------------------------------------------------------------

def test_reference_model_loads_and_gives_finite_logits(tiny_checkpoint: Path) -> None:
    ckpt = load_checkpoint(str(tiny_checkpoint), "main", offline=True)
    assert ckpt.path == str(tiny_checkpoint)
    model = reference_model(ckpt)
    assert not model.training
    with torch.no_grad():
        logits = model(torch.tensor([[1, 300, 301, 302, 5, 17]])).logits
    assert logits.shape == (1, 6, ckpt.arch.vocab_size) and logits.dtype == torch.float32
    assert bool(torch.isfinite(logits).all())
    # Well-conditioned: the next-token distribution is neither flat nor one-hot.
    top = torch.softmax(logits[0, -1], dim=-1).max()
    assert 1.5 / ckpt.arch.vocab_size < float(top) < 0.9


def test_quantization_config_in_config_json_replaces_quantize_config(folder: Path) -> None:
    (folder / "quantize_config.json").unlink()
    ckpt = load_checkpoint(str(folder), None)
    assert ckpt.quant == TINY_QUANT


def test_any_safetensors_file_name_is_loaded(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "gptq_model-4bit-32g.safetensors")
    assert load_checkpoint(str(folder), None).weights.layers[1].down_proj.bits == 4


def test_sharded_checkpoint_with_index(folder: Path,
                                       tiny_tensors: dict[str, torch.Tensor]) -> None:
    (folder / "model.safetensors").unlink()
    names = sorted(tiny_tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: tiny_tensors[n] for n in part}, str(folder / file))
    weight_map = {n: file for file, part in shards.items() for n in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ckpt = load_checkpoint(str(folder), None)
    assert torch.equal(ckpt.weights.layers[0].q_proj.qweight, tiny_tensors[f"{Q_PROJ}.qweight"])
    # A shard the index names must exist.
    (folder / "model-00002-of-00002.safetensors").unlink()
    refused(folder, "model.safetensors.index.json", "model-00002-of-00002.safetensors")


def test_tensors_without_g_idx_load_when_act_order_is_off(
        tiny_arch: LlamaArchConfig, tiny_tensors: dict[str, torch.Tensor]) -> None:
    tensors = {k: v for k, v in tiny_tensors.items() if not k.endswith(".g_idx")}
    quant = QuantConfig(bits=4, group_size=32, desc_act=False, sym=True)
    weights = load_from_tensors(tiny_arch, quant, tensors, "memory")
    assert weights.layers[0].q_proj.g_idx is None


def test_tied_embeddings_stand_in_for_a_missing_lm_head(
        tiny_arch: LlamaArchConfig, tiny_tensors: dict[str, torch.Tensor]) -> None:
    tied = LlamaArchConfig(**{**vars(tiny_arch), "tie_word_embeddings": True})
    tensors = {k: v for k, v in tiny_tensors.items() if k != "lm_head.weight"}
    weights = load_from_tensors(tied, TINY_QUANT, tensors, "memory")
    assert weights.lm_head is weights.embed_tokens


# --- what is refused, from the configs and files ----------------------------------------------

@pytest.mark.parametrize("bits", [2, 3])
def test_unsupported_bits(folder: Path, bits: int) -> None:
    edit_json(folder / "quantize_config.json", lambda d: d.update(bits=bits))
    edit_json(folder / "config.json", lambda d: d.pop("quantization_config"))
    refused(folder, "quantize_config.json", "bits must be 4 or 8", f"got {bits}")


def test_architecture_not_llama(folder: Path) -> None:
    edit_json(folder / "config.json",
              lambda d: d.update(model_type="mistral", architectures=["MistralForCausalLM"]))
    refused(folder, "config.json", "expected a Llama model", "'mistral'")


def test_quant_method_other_than_gptq(folder: Path) -> None:
    (folder / "quantize_config.json").unlink()
    edit_json(folder / "config.json",
              lambda d: d["quantization_config"].update(quant_method="awq"))
    refused(folder, "config.json (quantization_config)", "quant_method must be 'gptq'", "awq")


def test_gptq_v2_zero_format_is_refused(folder: Path) -> None:
    edit_json(folder / "quantize_config.json", lambda d: d.update(checkpoint_format="gptq_v2"))
    refused(folder, "quantize_config.json", "checkpoint_format", "gptq_v2")


def test_quantize_config_and_config_json_must_agree(folder: Path) -> None:
    edit_json(folder / "quantize_config.json", lambda d: d.update(group_size=64))
    refused(folder, "quantize_config.json", "quantization_config", "must agree")


@pytest.mark.parametrize("missing, fragment", [
    ("config.json", "config.json: file not found"),
    ("model.safetensors", "no *.safetensors weights file"),
])
def test_missing_files(folder: Path, missing: str, fragment: str) -> None:
    (folder / missing).unlink()
    refused(folder, fragment)


def test_missing_quantize_config(folder: Path) -> None:
    (folder / "quantize_config.json").unlink()
    edit_json(folder / "config.json", lambda d: d.pop("quantization_config"))
    refused(folder, "quantize_config.json: file not found", "no quantization_config")


def test_missing_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.model").unlink()
    (folder / "tokenizer.json").unlink()
    refused(folder, "no tokenizer", "tokenizer.model or tokenizer.json")


def test_corrupt_weights_file(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    refused(folder, "model.safetensors: not a readable safetensors file")


def test_broken_json(folder: Path) -> None:
    (folder / "config.json").write_text("{not json")
    refused(folder, "config.json: not valid JSON")


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_checkpoint(str(tmp_path / "nowhere"), None, offline=True)


# --- what is refused, tensor by tensor --------------------------------------------------------

def refused_tensors(arch: LlamaArchConfig, tensors: dict[str, torch.Tensor], *fragments: str,
                    quant: QuantConfig = TINY_QUANT) -> None:
    with pytest.raises(CheckpointError) as info:
        load_from_tensors(arch, quant, tensors, "model.safetensors")
    assert str(info.value).startswith("model.safetensors: ")
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_missing_tensor(tiny_arch: LlamaArchConfig,
                        tiny_tensors: dict[str, torch.Tensor]) -> None:
    tensors = {k: v for k, v in tiny_tensors.items() if k != "model.layers.1.mlp.up_proj.scales"}
    refused_tensors(tiny_arch, tensors, "missing tensor model.layers.1.mlp.up_proj.scales",
                    "(8, 768)")


def test_missing_g_idx_with_act_order(tiny_arch: LlamaArchConfig,
                                      tiny_tensors: dict[str, torch.Tensor]) -> None:
    tensors = {k: v for k, v in tiny_tensors.items() if k != f"{Q_PROJ}.g_idx"}
    refused_tensors(tiny_arch, tensors, f"missing tensor {Q_PROJ}.g_idx", "act-order")


def test_misshaped_tensor(tiny_arch: LlamaArchConfig,
                          tiny_tensors: dict[str, torch.Tensor]) -> None:
    tensors = {**tiny_tensors, f"{Q_PROJ}.qweight": torch.zeros(64, 256, dtype=torch.int32)}
    refused_tensors(tiny_arch, tensors, f"tensor {Q_PROJ}.qweight has shape (64, 256), "
                    "expected (32, 256) for 4-bit")
    norm = {**tiny_tensors, "model.norm.weight": torch.ones(255, dtype=torch.float16)}
    refused_tensors(tiny_arch, norm, "model.norm.weight has shape (255,), expected (256,)")


def test_checkpoint_of_another_bit_width_than_its_config(
        tiny_arch: LlamaArchConfig, tiny_tensors: dict[str, torch.Tensor]) -> None:
    eight_bit = QuantConfig(bits=8, group_size=32, desc_act=True, sym=True)
    refused_tensors(tiny_arch, tiny_tensors, "qweight has shape (32, 256), expected (64, 256)",
                    "8-bit", quant=eight_bit)


@pytest.mark.parametrize("name, bad, fragment", [
    (f"{Q_PROJ}.qweight", torch.int64, "dtype int64, expected int32"),
    (f"{Q_PROJ}.scales", torch.float32, "dtype float32, expected float16"),
    ("model.embed_tokens.weight", torch.int32, "expected float16 or bfloat16 or float32"),
])
def test_wrong_dtype(tiny_arch: LlamaArchConfig, tiny_tensors: dict[str, torch.Tensor],
                     name: str, bad: torch.dtype, fragment: str) -> None:
    tensors = {**tiny_tensors, name: tiny_tensors[name].to(bad)}
    refused_tensors(tiny_arch, tensors, f"tensor {name}", fragment)


def test_group_size_not_dividing_in_features(tiny_arch: LlamaArchConfig,
                                             tiny_tensors: dict[str, torch.Tensor]) -> None:
    quant = QuantConfig(bits=4, group_size=96, desc_act=True, sym=True)
    refused_tensors(tiny_arch, tiny_tensors, "group_size 96 does not divide hidden_size 256",
                    quant=quant)


def test_g_idx_out_of_range(tiny_arch: LlamaArchConfig,
                            tiny_tensors: dict[str, torch.Tensor]) -> None:
    g_idx = tiny_tensors[f"{Q_PROJ}.g_idx"].clone()
    g_idx[5] = 8
    refused_tensors(tiny_arch, {**tiny_tensors, f"{Q_PROJ}.g_idx": g_idx},
                    f"{Q_PROJ}.g_idx has groups 0..8, expected 0..7")
