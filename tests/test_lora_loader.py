"""Loading PEFT adapters: PEFT's own files (safetensors and .bin, rsLoRA, rank and alpha
patterns) give the engine the logits PEFT computes, and every kind of bad adapter is refused
with a message naming the adapter and the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from engine.checkpoint.arch import read_arch_config
from engine.core.llm_engine import LLMEngine
from engine.lora.peft import BIN_FILE, CONFIG_FILE, SAFETENSORS_FILE, load_adapter
from engine.lora.spec import LoraConfig, LoraError, LoraSpec
from engine.lora.synth import AdapterSpec
from tests.conftest import cpu_engine_config
from tests.engine_helpers import paged_logits
from tests.lora_helpers import PeftReference, lora_logits, make_adapter

peft = pytest.importorskip("peft")

PROMPT = "A little adapter changes what the model says next."


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("safetensors", [True, False])
def test_an_adapter_saved_by_peft_gives_peft_logits(safetensors: bool, tmp_path: Path,
                                                    tiny_checkpoint: Path) -> None:
    """PEFT makes and saves the adapter (random A and B, rsLoRA, per-module rank and alpha);
    our loader reads PEFT's files; the engine's logits equal the PEFT model's."""
    ref = PeftReference(tiny_checkpoint)
    config = peft.LoraConfig(r=8, lora_alpha=12, use_rslora=True, init_lora_weights=False,
                             target_modules=["q_proj", "v_proj", "o_proj", "up_proj",
                                             "down_proj"],
                             rank_pattern={"down_proj": 4}, alpha_pattern={"o_proj": 5})
    torch.manual_seed(3)
    model = peft.get_peft_model(ref.fresh_base(), config).eval()
    folder = tmp_path / "peft-adapter"
    model.save_pretrained(str(folder), safe_serialization=safetensors)
    assert (folder / (SAFETENSORS_FILE if safetensors else BIN_FILE)).is_file()

    engine = LLMEngine.from_config(cpu_engine_config(tiny_checkpoint, lora=LoraConfig(
        max_loras=1, max_lora_rank=8, adapters=(LoraSpec("saved", str(folder)),))))
    prompt = engine.tokenizer.encode(PROMPT)
    with torch.no_grad():
        want = model(input_ids=torch.tensor([prompt])).logits[0, -1]
        base = ref.last_logits(None, prompt)
    got = lora_logits(engine, "saved", prompt)
    assert relative_error(got, want) < 1e-4
    assert relative_error(base, want) > 1e-2  # the adapter does change the output
    info = engine.lora_adapters()[0]
    assert info.rank == 8
    assert info.target_modules == ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")
    # The base model is untouched next to it.
    assert relative_error(paged_logits(engine, prompt), base) < 1e-4


def test_the_spec_syntax() -> None:
    assert LoraSpec.parse("sql=owner/repo@v2") == LoraSpec("sql", "owner/repo", "v2")
    assert LoraSpec.parse("sql=/models/adapter") == LoraSpec("sql", "/models/adapter", None)
    for bad in ("sql", "=path", "sql=", "sql=repo@", "has space=x"):
        with pytest.raises(LoraError):
            LoraSpec.parse(bad)
    with pytest.raises(LoraError, match="given twice"):
        LoraConfig(adapters=(LoraSpec("a", "x"), LoraSpec("a", "y")))


def _refused(folder: Path, base: Path, match: str, max_rank: int = 16) -> None:
    with pytest.raises(LoraError, match=match) as err:
        load_adapter(LoraSpec("bad-one", str(folder)), read_arch_config(base), max_rank,
                     offline=True)
    assert "LoRA adapter 'bad-one'" in str(err.value)


def _edit_config(folder: Path, **changes: object) -> None:
    path = folder / CONFIG_FILE
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_bad_adapters_are_refused_naming_the_problem(tmp_path: Path, lora_root: Path,
                                                     tiny_checkpoint: Path,
                                                     checkpoint_root: Path) -> None:
    good = make_adapter(lora_root, tiny_checkpoint, AdapterSpec(rank=8, seed=5))
    _refused(good, tiny_checkpoint, r"rank 8, over the server's max_lora_rank 4", max_rank=4)
    _refused(tmp_path / "absent", tiny_checkpoint, "no such checkpoint folder")
    _refused(tmp_path, tiny_checkpoint, "adapter_config.json: file not found")

    no_weights = _copy(good, tmp_path / "no-weights")
    (no_weights / SAFETENSORS_FILE).unlink()
    _refused(no_weights, tiny_checkpoint, "no weights file")

    broken = _copy(good, tmp_path / "broken-json")
    (broken / CONFIG_FILE).write_text("{not json")
    _refused(broken, tiny_checkpoint, "not valid JSON")

    for i, (changes, match) in enumerate([
            ({"target_modules": ["q_proj", "lm_head"]}, "lm_head are not linear layers"),
            ({"use_dora": True}, "DoRA"), ({"bias": "all"}, "bias='all'"),
            ({"modules_to_save": ["lm_head"]}, "modules_to_save"), ({"r": 0}, "'r' must be"),
            ({"peft_type": "IA3"}, "only LORA"), ({"r": 4}, r"has shape \(8, 256\), expected "
                                                             r"\(4, 256\)")]):
        folder = _copy(good, tmp_path / f"config-{i}")
        _edit_config(folder, **changes)
        _refused(folder, tiny_checkpoint, match)

    # An adapter trained for a model of other shapes (the 8-bit tiny model has the same;
    # fake one by cutting the hidden size of the tensors).
    from safetensors.torch import load_file, save_file

    other = _copy(good, tmp_path / "other-shapes")
    tensors = load_file(str(other / SAFETENSORS_FILE))
    key = next(k for k in tensors if "o_proj.lora_B" in k)
    tensors[key] = tensors[key][:128].contiguous()
    save_file(tensors, str(other / SAFETENSORS_FILE))
    _refused(other, tiny_checkpoint, r"o_proj.lora_B has shape \(128, 8\), expected \(256, 8\)")

    extra = _copy(good, tmp_path / "embedding")
    tensors = load_file(str(extra / SAFETENSORS_FILE))
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(8, 1000)
    save_file(tensors, str(extra / SAFETENSORS_FILE))
    _refused(extra, tiny_checkpoint, "embed_tokens.lora_embedding_A is not a lora_A/lora_B")

    deep = _copy(good, tmp_path / "layer-99")
    tensors = load_file(str(deep / SAFETENSORS_FILE))
    tensors["base_model.model.model.layers.99.mlp.up_proj.lora_A.weight"] = torch.zeros(8, 256)
    tensors["base_model.model.model.layers.99.mlp.up_proj.lora_B.weight"] = torch.zeros(768, 8)
    save_file(tensors, str(deep / SAFETENSORS_FILE))
    _refused(deep, tiny_checkpoint, "layer 99 does not exist")

    half = _copy(good, tmp_path / "half")
    tensors = load_file(str(half / SAFETENSORS_FILE))
    del tensors[next(k for k in tensors if "k_proj.lora_B" in k)]
    save_file(tensors, str(half / SAFETENSORS_FILE))
    _refused(half, tiny_checkpoint, "k_proj: lora_B is missing")


def test_a_bad_adapter_at_start_refuses_the_engine(lora_root: Path,
                                                   tiny_checkpoint: Path) -> None:
    good = make_adapter(lora_root, tiny_checkpoint, AdapterSpec(rank=8, seed=5))
    with pytest.raises(LoraError, match=r"LoRA adapter 'big'.*over the server's max_lora_rank"):
        LLMEngine.from_config(cpu_engine_config(tiny_checkpoint, lora=LoraConfig(
            max_lora_rank=4, adapters=(LoraSpec("big", str(good)),))))


def test_a_hub_adapter_resolves_through_the_download_cache(
        lora_root: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """owner/name@revision goes to huggingface_hub with the adapter's own file patterns."""
    from engine.checkpoint import hub

    good = make_adapter(lora_root, tiny_checkpoint, AdapterSpec(rank=4, seed=6))
    calls: list[dict[str, object]] = []

    def snapshot_download(repo_id: str, **kwargs: object) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        return str(good)

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    adapter = load_adapter(LoraSpec.parse("orca=someone/llama-2-13b-orca-lora@v1"),
                           read_arch_config(tiny_checkpoint), 16)
    assert adapter.rank == 4 and adapter.path == str(good)
    assert calls[0]["repo_id"] == "someone/llama-2-13b-orca-lora"
    assert calls[0]["revision"] == "v1" and calls[0]["local_files_only"] is True
    assert set(calls[0]["allow_patterns"]) == {CONFIG_FILE, SAFETENSORS_FILE,  # type: ignore[arg-type]
                                               BIN_FILE}
