"""Synthetic PEFT adapters for tests (made once per session root) and the transformers + PEFT
reference that runs them."""

from __future__ import annotations

import copy
import hashlib
import itertools
from pathlib import Path

import torch

from engine.checkpoint.loader import load_checkpoint
from engine.core.llm_engine import LLMEngine
from engine.core.scheduler import ScheduledSeq, SchedulerOutput
from engine.core.sequence import Sequence
from engine.lora.peft import CONFIG_FILE
from engine.lora.synth import AdapterSpec, write_adapter
from engine.params import SamplingParams
from tests.reference import reference_model

_ids = itertools.count(20_000_000)


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

    def fresh_base(self) -> torch.nn.Module:
        """A copy of the base to wrap (PEFT changes the model it wraps in place)."""
        return copy.deepcopy(self.base)

    def model(self, adapter: Path | None) -> torch.nn.Module:
        if adapter not in self._models:
            from peft import PeftModel

            self._models[adapter] = PeftModel.from_pretrained(self.fresh_base(),
                                                              str(adapter)).eval()
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


def lora_logits(engine: LLMEngine, lora: str | None, prompt: list[int],
                steps: list[int] | None = None) -> torch.Tensor:
    """Last-position logits [V] for ``prompt`` with adapter ``lora`` (None: the base), through
    the engine's adapter slots, block tables and KV cache, in chunks of ``steps`` tokens."""
    handle = None if lora is None else engine.loras.acquire(lora)
    seq = Sequence(next(_ids), "lora-probe", list(prompt), SamplingParams(max_tokens=1),
                   lora=handle)
    blocks, runner = engine.scheduler.block_manager, engine.runner
    logits = None
    try:
        for n in steps or [len(prompt)]:
            blocks.allocate(seq, seq.num_computed_tokens + n)
            inputs = runner.step_inputs(SchedulerOutput((ScheduledSeq(seq, n),), ()))
            hidden = runner.model.forward(inputs.input_ids, inputs.positions, runner.kv_caches,
                                          inputs.meta, inputs.lora)
            logits = runner.model.compute_logits(hidden[-1:])[0]
            seq.num_computed_tokens += n
    finally:
        blocks.free(seq)
        if handle is not None:
            engine.loras.release(handle)
    assert logits is not None
    return logits[:engine.tokenizer.vocab_size].float().cpu()
