"""Hub resolution against a pre-populated huggingface_hub cache layout, never the network:
a cached revision is used without a download, offline mode refuses what is not cached, and a
download (stood in for here) asks only for the files the engine reads."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from engine.checkpoint import hub
from engine.checkpoint.hub import ALLOW_PATTERNS, resolve_checkpoint
from engine.checkpoint.loader import load_checkpoint
from engine.checkpoint.types import CheckpointError

REPO = "TheBloke/Llama-2-13B-GPTQ"
BRANCH = "gptq-4bit-32g-actorder_True"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def cache(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """<cache>/models--TheBloke--Llama-2-13B-GPTQ/{refs/<branch>, snapshots/<commit>/...},
    the layout huggingface_hub writes (files are copies here, symlinks to blobs there)."""
    root = tmp_path / "hf-cache"
    repo = root / "models--TheBloke--Llama-2-13B-GPTQ"
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / BRANCH).write_text(COMMIT)
    return root


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Fail any call that could reach the network; record every call."""
    real = hub.snapshot_download
    calls: list[dict[str, Any]] = []

    def guarded(repo_id: str, **kwargs: Any) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        if not kwargs.get("local_files_only"):
            raise AssertionError("a download was attempted")
        return real(repo_id, **kwargs)

    monkeypatch.setattr(hub, "snapshot_download", guarded)
    return calls


def test_cached_branch_resolves_to_its_snapshot(cache: Path,
                                                no_network: list[dict[str, Any]]) -> None:
    path = resolve_checkpoint(REPO, BRANCH, download_dir=str(cache), offline=True)
    assert path == cache / "models--TheBloke--Llama-2-13B-GPTQ" / "snapshots" / COMMIT
    assert no_network[0]["revision"] == BRANCH and no_network[0]["cache_dir"] == str(cache)


def test_cached_files_are_used_without_a_download_even_online(
        cache: Path, no_network: list[dict[str, Any]]) -> None:
    ckpt = load_checkpoint(REPO, BRANCH, download_dir=str(cache), offline=False)
    assert (ckpt.quant.bits, ckpt.quant.group_size, ckpt.quant.desc_act) == (4, 32, True)
    assert ckpt.path.endswith(COMMIT)
    # A commit hash is a revision too.
    assert resolve_checkpoint(REPO, COMMIT, download_dir=str(cache)).name == COMMIT


def test_offline_refuses_an_uncached_revision(cache: Path,
                                              no_network: list[dict[str, Any]]) -> None:
    with pytest.raises(CheckpointError, match=r"gptq-8bit-128g-actorder_True.*offline"):
        resolve_checkpoint(REPO, "gptq-8bit-128g-actorder_True", download_dir=str(cache),
                           offline=True)
    with pytest.raises(CheckpointError, match="offline"):
        resolve_checkpoint("someone/other-model", None, download_dir=str(cache), offline=True)


def test_uncached_revision_downloads_only_what_the_engine_reads(
        cache: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    real = hub.snapshot_download

    def fake_download(repo_id: str, **kwargs: Any) -> str:
        calls.append(kwargs)
        if kwargs.get("local_files_only"):
            return real(repo_id, **kwargs)  # the cache lookup, which finds nothing for "main"
        return str(tiny_checkpoint)

    monkeypatch.setattr(hub, "snapshot_download", fake_download)
    path = resolve_checkpoint(REPO, "main", download_dir=str(cache))
    assert path == tiny_checkpoint
    download = calls[-1]
    assert not download.get("local_files_only") and download["revision"] == "main"
    assert download["cache_dir"] == str(cache)
    assert download["allow_patterns"] == list(ALLOW_PATTERNS)


def test_a_folder_is_used_as_is_and_bad_names_are_refused(tiny_checkpoint: Path,
                                                          tmp_path: Path) -> None:
    assert resolve_checkpoint(str(tiny_checkpoint), "main") == tiny_checkpoint
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        resolve_checkpoint(str(tmp_path / "missing" / "model"), None)
    with pytest.raises(CheckpointError, match="not a valid hub repo id"):
        resolve_checkpoint("bad name!/model", None, download_dir=str(tmp_path), offline=True)
