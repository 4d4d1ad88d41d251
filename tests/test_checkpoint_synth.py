"""Synthetic checkpoints: the on-disk format, the synth -> load round trip for every branch's
layout, determinism, the streaming writer, and the CLI entry points."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engine.checkpoint.dequant import dequantize, unpack_cols
from engine.checkpoint.loader import load_checkpoint
from engine.checkpoint.marker import SYNTH_MARKER_FILE, has_random_weights
from engine.checkpoint.safetensors_stream import SafetensorsStreamWriter, TensorSpec
from engine.checkpoint.synth import (
    SynthSpec,
    configure_parser,
    draw_weights,
    preset_arch,
    run,
    tensor_plan,
)
from tests.checkpoints import make_checkpoint
from tests.conftest import BRANCHES

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("branch", list(BRANCHES))
def test_round_trip_for_every_branch_layout(branch: str, checkpoint_root: Path) -> None:
    bits, group_size, act_order = BRANCHES[branch]
    path = make_checkpoint(checkpoint_root, bits=bits, group_size=group_size,
                           act_order=act_order)
    ckpt = load_checkpoint(str(path), None, offline=True)
    assert (ckpt.quant.bits, ckpt.quant.group_size, ckpt.quant.desc_act) == BRANCHES[branch]
    arch = ckpt.arch
    assert arch == preset_arch("tiny", arch.vocab_size) and arch.vocab_size == 1000
    assert len(ckpt.weights.layers) == arch.num_layers
    assert ckpt.weights.embed_tokens.dtype == torch.float16

    floats = {name: (t, g) for name, t, g in
              draw_weights(arch, ckpt.quant, seed=0, device=torch.device("cpu"))}
    for n, layer in enumerate(ckpt.weights.layers):
        for name in LINEARS:
            w = getattr(layer, name)
            weight, g_idx = floats[w.name]
            assert w.name.startswith(f"model.layers.{n}.") and w.name.endswith(name)
            assert w.qweight.dtype == w.qzeros.dtype == torch.int32
            assert w.scales.dtype == torch.float16
            assert w.qweight.shape == (w.in_features * bits // 32, w.out_features)
            assert torch.equal(w.g_idx, g_idx.to(torch.int32))
            # Symmetric: every stored zero is 2^(bits-1) - 1, as AutoGPTQ writes it.
            assert bool((unpack_cols(w.qzeros, bits) == (1 << (bits - 1)) - 1).all())
            # Dequantised weights are the fp weights they came from, to within half a step.
            step = w.scales.float()[w.g_idx.long()].t()  # [out, in]
            assert float(((dequantize(w) - weight).abs() / step).max()) <= 0.5 + 1e-5
    g_idx = ckpt.weights.layers[0].q_proj.g_idx
    monotone = bool((g_idx[1:] >= g_idx[:-1]).all())
    assert monotone != (act_order and group_size is not None)


def test_synthetic_checkpoints_are_known_by_their_marker_not_their_name(
        tiny_checkpoint: Path, tmp_path: Path) -> None:
    marker = json.loads((tiny_checkpoint / SYNTH_MARKER_FILE).read_text())
    assert marker["weights"] == "random" and marker["spec"]["group_size"] == 32
    assert has_random_weights(tiny_checkpoint)
    assert load_checkpoint(str(tiny_checkpoint), None, offline=True).random_weights
    # The same files without the marker, in a folder named like the demo's, are taken as a
    # trained checkpoint; so is a folder whose file of that name says something else.
    copy = tmp_path / "demo-model"
    shutil.copytree(tiny_checkpoint, copy)
    (copy / SYNTH_MARKER_FILE).unlink()
    assert not load_checkpoint(str(copy), None, offline=True).random_weights
    (copy / SYNTH_MARKER_FILE).write_text('{"weights": "trained"}')
    assert not has_random_weights(copy)


def test_files_are_in_the_reference_format(tiny_checkpoint: Path) -> None:
    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert {"config.json", "quantize_config.json", "model.safetensors", "tokenizer.model",
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= names
    quantize = json.loads((tiny_checkpoint / "quantize_config.json").read_text())
    assert quantize == {"bits": 4, "group_size": 32, "damp_percent": 0.01, "desc_act": True,
                        "sym": True, "true_sequential": True, "model_name_or_path": None,
                        "model_file_base_name": "model"}
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["torch_dtype"] == "float16"
    assert config["quantization_config"] == {**quantize, "quant_method": "gptq"}

    # The standard reader takes the streamed file; names and dtypes are AutoGPTQ's.
    tensors = load_file(str(tiny_checkpoint / "model.safetensors"))
    with safe_open(str(tiny_checkpoint / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    prefix = "model.layers.1.self_attn.q_proj"
    assert tensors[f"{prefix}.qweight"].dtype == torch.int32
    assert tensors[f"{prefix}.scales"].dtype == torch.float16
    assert tensors[f"{prefix}.g_idx"].dtype == torch.int32
    assert tensors["model.layers.0.input_layernorm.weight"].dtype == torch.float16
    assert tensors["lm_head.weight"].shape == (1000, 256)
    plan = tensor_plan(preset_arch("tiny", 1000), SynthSpec("tiny", 4, 32, True).quant)
    assert set(tensors) == {s.name for s in plan} and len(plan) == 1 + 2 * (2 + 7 * 4) + 2


def test_weight_statistics_keep_activations_tame(tiny_checkpoint: Path) -> None:
    ckpt = load_checkpoint(str(tiny_checkpoint), None, offline=True)
    layer = ckpt.weights.layers[0]
    for name, expected in (("v_proj", 0.3), ("down_proj", 0.3), ("q_proj", 1.2)):
        w = dequantize(getattr(layer, name))  # [out, in]
        assert abs(float(w.std()) * w.shape[1] ** 0.5 / expected - 1) < 0.1
    assert abs(float(layer.input_layernorm.float().mean()) - 1) < 0.02
    assert abs(float(ckpt.weights.embed_tokens.float().std()) * 16 - 1) < 0.05


def test_synthesis_is_deterministic_per_seed(checkpoint_root: Path, tmp_path: Path) -> None:
    a = make_checkpoint(checkpoint_root, bits=4, group_size=32, act_order=True)
    again = make_checkpoint(tmp_path, bits=4, group_size=32, act_order=True)
    other = make_checkpoint(tmp_path, bits=4, group_size=32, act_order=True, seed=1)
    for name in ("model.safetensors", "tokenizer.model", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (again / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()


def test_cli_writes_a_checkpoint_and_refuses_bad_group_sizes(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str],
                                                           ) -> None:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args(["--preset", "tiny", "--bits", "8", "--group-size", "-1",
                              "--act-order", "--seed", "3", "--out", str(tmp_path / "m")])
    assert run(args) == 0
    ckpt = load_checkpoint(str(tmp_path / "m"), None)
    assert (ckpt.quant.bits, ckpt.quant.group_size, ckpt.quant.desc_act) == (8, None, True)
    assert ckpt.weights.layers[0].q_proj.scales.shape == (1, 256)

    # 512 does not divide the tiny preset's intermediate size 768: refused before any weights.
    bad = parser.parse_args(["--group-size", "512", "--out", str(tmp_path / "bad")])
    assert run(bad) == 2
    assert "group_size 512 does not divide" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        SynthSpec("tiny", 3, 128, False)
    with pytest.raises(ValueError, match="preset"):
        SynthSpec("7b", 4, 128, False)
    with pytest.raises(ValueError, match="group_size"):
        SynthSpec("tiny", 4, 0, False)


def test_13b_preset_has_llama_2_13b_shapes() -> None:
    arch = preset_arch("13b", 1000)
    assert (arch.hidden_size, arch.intermediate_size, arch.num_layers, arch.num_heads,
            arch.num_kv_heads, arch.vocab_size, arch.max_position_embeddings) == (
        5120, 13824, 40, 40, 40, 32000, 4096)
    plan = tensor_plan(arch, SynthSpec("13b", 4, 128, False).quant)
    # About 7.3 GB, as TheBloke's main branch.
    assert 7.0e9 < sum(s.nbytes for s in plan) < 7.5e9


def test_stream_writer_checks_order_and_completeness(tmp_path: Path) -> None:
    specs = [TensorSpec("a", torch.float16, (2, 3)), TensorSpec("b", torch.int32, (4,))]
    with SafetensorsStreamWriter(tmp_path / "ok.safetensors", specs, {"format": "pt"}) as w:
        w.write("a", torch.ones(2, 3, dtype=torch.float16))
        w.write("b", torch.arange(4, dtype=torch.int32))
    loaded = load_file(str(tmp_path / "ok.safetensors"))
    assert torch.equal(loaded["b"], torch.arange(4, dtype=torch.int32))
    assert torch.equal(loaded["a"], torch.ones(2, 3, dtype=torch.float16))

    w = SafetensorsStreamWriter(tmp_path / "bad.safetensors", specs)
    with pytest.raises(ValueError, match="expected a"):
        w.write("b", torch.arange(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="expected a"):
        w.write("a", torch.ones(2, 3, dtype=torch.float32))
    w.write("a", torch.ones(2, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match="closed before b"):
        w.close()


def test_13b_preset_has_llama_2s_vocabulary(tmp_path: Path) -> None:
    """The 13b preset's tokenizer has Llama 2's 32000 entries, matching its embedding and
    lm_head, so benchmarks sample over the real vocabulary."""
    from engine.checkpoint.synth import TOKENIZER_VOCAB_SIZES, preset_arch
    from engine.checkpoint.synth_tokenizer import train_tokenizer
    from engine.tokenizer.tokenizer import Tokenizer

    size = TOKENIZER_VOCAB_SIZES["13b"]
    assert size == preset_arch("13b", size).vocab_size == 32000
    train_tokenizer(tmp_path, size)
    tok = Tokenizer.from_pretrained(str(tmp_path))
    assert tok.vocab_size == 32000
    text = "Hello world, a story about the sea."
    assert tok.decode(tok.encode(text)) == text
