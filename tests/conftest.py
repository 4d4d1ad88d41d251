"""Shared fixtures: synthetic checkpoints (made once per session) and engines over them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from engine.checkpoint.synth_tokenizer import train_tokenizer
from engine.config import EngineConfig
from engine.tokenizer.tokenizer import Tokenizer
from tests.checkpoints import make_checkpoint

if TYPE_CHECKING:
    from tests.fake_engine import ServerProcess

# The eight quantisation layouts of TheBloke/Llama-2-13B-GPTQ's branches: (bits, group, act-order)
BRANCHES = {
    "main": (4, 128, False),
    "gptq-4bit-32g-actorder_True": (4, 32, True),
    "gptq-4bit-64g-actorder_True": (4, 64, True),
    "gptq-4bit-128g-actorder_True": (4, 128, True),
    "gptq-8bit-128g-actorder_True": (8, 128, True),
    "gptq-8bit-64g-actorder_True": (8, 64, True),
    "gptq-8bit-128g-actorder_False": (8, 128, False),
    "gptq-8bit--1g-actorder_True": (8, None, True),
}


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def tiny_checkpoint(checkpoint_root: Path) -> Path:
    """The default tiny test model: 4-bit, group size 32, act-order on."""
    return make_checkpoint(checkpoint_root, bits=4, group_size=32, act_order=True)


def cpu_engine_config(path: Path, **overrides: object) -> EngineConfig:
    values: dict[str, object] = dict(model=str(path), revision=None, offline=True, device="cpu",
                                     dtype="float32", num_kv_blocks=256, block_size=16,
                                     max_num_seqs=32, max_num_batched_tokens=512,
                                     max_model_len=1024)
    values.update(overrides)
    return EngineConfig(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained synthetic Llama-style tokenizer, once per session."""
    path = tmp_path_factory.getbasetemp() / "synth-tokenizer"
    if not (path / "tokenizer.json").exists():
        train_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tok(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="session")
def structured_server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
                      ) -> Iterator[ServerProcess]:
    """The real ``gptq-serve serve`` over the tiny checkpoint, shared by the structured-output
    and tool-calling suites (one model load for both)."""
    # Imported here: the schema checker they pull in is not needed by the GPU-only suites.
    from tests.server import real_server, serving

    log = tmp_path_factory.mktemp("structured") / "server.log"
    srv = real_server(tiny_checkpoint, log, "--served-model-name", "tiny",
                      "--max-model-len", "2048", "--num-kv-blocks", "1024",
                      "--max-num-seqs", "16", "--max-tokens-limit", "600",
                      "--max-grammar-bytes", "8192")
    with serving(srv):
        yield srv


@pytest.fixture(scope="session")
def lora_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where synthetic LoRA adapters are written, once per session (tests/lora_helpers.py)."""
    return tmp_path_factory.mktemp("lora-adapters")
