"""The engine against transformers' LlamaForCausalLM on the dequantised weights, for the
quantisation layout of every branch of TheBloke/Llama-2-13B-GPTQ."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.checkpoint.loader import load_checkpoint
from engine.core.llm_engine import LLMEngine
from engine.params import SamplingParams
from tests.checkpoints import make_checkpoint
from tests.conftest import BRANCHES, cpu_engine_config
from tests.engine_helpers import output_tokens, paged_logits, run_to_completion
from tests.reference import reference_model

NUM_NEW_TOKENS = 24
PROMPT_TEXT = "The quick brown fox jumps over the lazy dog, and then it said: café 123!"


def reference_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(ids).logits[0, -1]
            token = int(logits.argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("branch", list(BRANCHES))
def test_greedy_tokens_and_logits_match_transformers(branch: str, checkpoint_root: Path) -> None:
    bits, group_size, act_order = BRANCHES[branch]
    path = make_checkpoint(checkpoint_root, bits=bits, group_size=group_size,
                           act_order=act_order)
    engine = LLMEngine.from_config(cpu_engine_config(path))
    assert engine.model_info.bits == bits and engine.model_info.group_size == group_size
    assert engine.model_info.act_order == act_order
    ref = reference_model(load_checkpoint(str(path), None, offline=True))
    prompt = engine.tokenizer.encode(PROMPT_TEXT)

    with torch.no_grad():
        ref_logits = ref(torch.tensor([prompt])).logits[0, -1]
    ours = paged_logits(engine, prompt)
    assert relative_error(ours, ref_logits) < 1e-3
    # The same logits when the prompt is prefilled in chunks across block boundaries.
    assert relative_error(paged_logits(engine, prompt, chunk=5), ref_logits) < 1e-3

    deltas = run_to_completion(engine, {"greedy": (
        prompt, SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True))})
    assert output_tokens(deltas["greedy"]) == reference_greedy(ref, prompt, NUM_NEW_TOKENS)
    blocks = engine.scheduler.block_manager
    assert blocks.num_available_blocks == blocks.num_blocks
