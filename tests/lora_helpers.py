"""Synthetic PEFT adapters for tests (made once per session root) and the transformers + PEFT
reference that runs them."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import torch

from engine.checkpoint.loader import load_checkpoint
from engine.lora.peft import CONFIG_FILE
from engine.lora.synth import AdapterSpec, write_adapter
from tests.reference import reference_model


def make_adapter(root: Path, base: Path, spec: AdapterSpec) -> Path:
    """The folder of ``spec``'s adapter for ``base`` under ``root``, written on first use."""
    key = hashlib.sha256(repr((str(base), spec)).encode()).hexdigest()[:12]
    folder = root / f"lora-{spec.rank}-{key}"
    if not (folder / CONFIG_FILE).is_file():
        write_adapter(base, folder, spec)
    return folder


class PeftReference:
    """transformers' LlamaForCausalLM on the dequantised base, float32, and one PEFT model per
    adapter folder over a copy of it (PEFT reads the adapter files itself)."""

    def __init__(self, base: Path) -> None:
        self.base = reference_model(load_checkpoint(str(base), None, offline=True))
        self._models: dict[Path | None, torch.nn.Module] = {None: self.base}

    def model(self, adapter: Path | None) -> torch.nn.Module:
        if adapter not in self._models:
            from peft import PeftModel

            self._models[adapter] = PeftModel.from_pretrained(
                copy.deepcopy(self.base), str(adapter)).eval()
        return self._models[adapter]

    def last_logits(self, adapter: Path | None, prompt: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return self.model(adapter)(input_ids=torch.tensor([prompt])).logits[0, -1]

    def greedy(self, adapter: Path | None, prompt: list[int], n: int) -> list[int]:
        ids = list(prompt)
        model = self.model(adapter)
        with torch.no_grad():
            for _ in range(n):
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        return ids[len(prompt):]
