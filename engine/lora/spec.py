"""What names an adapter, and the limits adapters live under. Torch-free (the HTTP layer and the
settings build these).

The seven projections of a Llama layer are the only modules an adapter may target: the
embeddings and the LM head stay the base model's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# The linear layers of one Llama decoder layer, as PEFT's target_modules name them.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Adapter names appear in the "model" field, in metric labels and in URLs of /v1/models.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


class LoraError(ValueError):
    """An adapter cannot be used. The message names the adapter and the problem.

    ``code`` is machine-readable: "lora_not_found" (no adapter of that name is loaded),
    "lora_exists" (the name is taken), "lora_disabled" (this engine serves no adapters) or
    "invalid_lora" (a file, config or tensor of the adapter is wrong)."""

    def __init__(self, message: str, code: str = "invalid_lora") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class LoraSpec:
    """An adapter to load: a PEFT folder or a hub repo id (at ``revision``, None: "main")."""

    name: str
    source: str
    revision: str | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise LoraError(f"LoRA adapter name {self.name!r} must be 1-128 characters of "
                            "letters, digits and . _ : / - (starting with a letter or digit)")
        if not self.source:
            raise LoraError(f"LoRA adapter '{self.name}': no path or hub repo id given")

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """``name=path`` or ``name=repo@revision`` (the --lora-modules syntax). A local path
        that exists is taken whole even if it contains "@"."""
        name, sep, ref = text.strip().partition("=")
        if not sep or not name or not ref:
            raise LoraError(f"--lora-modules entry {text!r} must read name=path or "
                            "name=repo_id@revision")
        return cls.of(name, ref)

    @classmethod
    def of(cls, name: str, ref: str) -> LoraSpec:
        """``name`` loaded from ``ref``: a path, or ``repo_id@revision``."""
        revision = None
        if "@" in ref and not Path(ref).expanduser().exists():
            ref, revision = ref.rsplit("@", 1)
            if not ref or not revision:
                raise LoraError(f"LoRA adapter '{name}': empty path or revision around '@'")
        return cls(name=name, source=ref, revision=revision)

    def describe(self) -> str:
        return self.source if self.revision is None else f"{self.source}@{self.revision}"


@dataclass(frozen=True)
class LoraConfig:
    """LoRA serving limits. ``max_loras`` adapters fit in the device's fixed slots at once (a
    step never runs more distinct ones; the rest wait on the host); ``max_lora_rank`` sizes
    each slot and bounds what can be loaded. ``adapters`` are loaded at start-up;
    ``allow_runtime_updates`` lets adapters be loaded and unloaded while serving."""

    max_loras: int = 4
    max_lora_rank: int = 16
    adapters: tuple[LoraSpec, ...] = ()
    allow_runtime_updates: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.max_loras <= 64:
            raise LoraError(f"max_loras must be between 1 and 64, got {self.max_loras}")
        if not 1 <= self.max_lora_rank <= 512:
            raise LoraError(f"max_lora_rank must be between 1 and 512, got "
                            f"{self.max_lora_rank}")
        names = [a.name for a in self.adapters]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise LoraError(f"LoRA adapter name(s) given twice: {', '.join(dupes)}",
                            code="lora_exists")
