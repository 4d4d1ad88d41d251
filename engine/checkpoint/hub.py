"""Resolve a model reference to a local checkpoint folder: a folder as is, or a hub repo id plus
revision (a branch such as "gptq-4bit-32g-actorder_True", a tag or a commit) through
huggingface_hub's cache.

A revision whose files are already in the cache is used without touching the network, so a
server restarts offline once its model has been downloaded; only a missing or incomplete snapshot
is downloaded (huggingface_hub resumes interrupted files). Only the files the engine reads are
fetched: a GPTQ repo may also hold other formats that would cost gigabytes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.utils import (  # (.errors only from 0.24 on)
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from engine.checkpoint.types import CheckpointError

log = logging.getLogger(__name__)

# config.json, quantize_config.json, tokenizer_config.json, special_tokens_map.json,
# tokenizer.json, generation_config.json, a sharded checkpoint's index; the weights; sentencepiece.
ALLOW_PATTERNS = ("*.json", "*.safetensors", "tokenizer.model")
DEFAULT_REVISION = "main"


def _looks_like_path(model: str) -> bool:
    # A repo id is exactly "owner/name"; anything else with a separator is meant as a folder.
    return model.startswith((".", "/", "~")) or model.count("/") != 1 or "\\" in model


def resolve_checkpoint(model: str, revision: str | None, *, download_dir: str | None = None,
                       offline: bool = False,
                       allow_patterns: tuple[str, ...] = ALLOW_PATTERNS) -> Path:
    """The local folder holding ``model``'s files at ``revision`` (None: "main").

    ``download_dir`` is the huggingface_hub cache to use (None: its default, HF_HUB_CACHE).
    With ``offline`` the network is never used and a revision missing from the cache is an error.
    For a local folder ``revision`` is ignored: a folder has one version. ``allow_patterns``
    names the files fetched (a checkpoint's by default; a LoRA adapter passes its own).
    """
    folder = Path(model).expanduser()
    if folder.is_dir():
        return folder
    if _looks_like_path(model):
        raise CheckpointError(f"{model}: no such checkpoint folder (and not a hub repo id of "
                              "the form owner/name)")
    revision = revision or DEFAULT_REVISION
    where = f"{model} (revision {revision})"
    cached = _from_cache(model, revision, download_dir, allow_patterns)
    if cached is not None:
        return cached
    if offline:
        raise CheckpointError(
            f"{where}: not in the download cache {download_dir or '(huggingface_hub default)'} "
            "and offline mode is on; download it once with offline off, or pass a local folder")
    log.info("downloading %s into %s", where, download_dir or "the huggingface_hub cache")
    try:
        path = snapshot_download(model, revision=revision, cache_dir=download_dir,
                                 allow_patterns=list(allow_patterns))
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise CheckpointError(f"{where}: repository not found or not accessible (a gated or "
                              f"private repo needs HF_TOKEN): {e}") from e
    except RevisionNotFoundError as e:
        raise CheckpointError(f"{where}: no such branch, tag or commit in the repository") from e
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise CheckpointError(f"{where}: download failed: {e}") from e
    return Path(str(path))


def _from_cache(model: str, revision: str, download_dir: str | None,
                allow_patterns: tuple[str, ...]) -> Path | None:
    try:
        path = snapshot_download(model, revision=revision, cache_dir=download_dir,
                                 allow_patterns=list(allow_patterns), local_files_only=True)
    except HFValidationError as e:
        raise CheckpointError(f"{model}: not a valid hub repo id ({e})") from e
    except (LocalEntryNotFoundError, OSError):
        # Not cached, or cached only in part (huggingface_hub checks against the cached file
        # listing where it has one).
        return None
    return Path(str(path))
