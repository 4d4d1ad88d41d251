"""The engine benchmark's measures on the CPU: its TTFT times whole prompts (the prefix cache,
on by default, must not serve repetitions of the timed prompt)."""

from __future__ import annotations

from pathlib import Path

from engine.bench.engine_bench import make_prompts, time_to_first_token_ms
from engine.config import EngineConfig
from engine.core.llm_engine import LLMEngine


def test_ttft_computes_every_prompt_token_of_every_repetition(tiny_checkpoint: Path) -> None:
    engine = LLMEngine.from_config(EngineConfig(
        model=str(tiny_checkpoint), revision=None, offline=True, device="cpu",
        dtype="float32", max_model_len=256, max_num_batched_tokens=256))
    assert engine.scheduler.block_manager.enable_caching
    prompt = make_prompts(1, 100, engine.tokenizer.vocab_size, seed=1)[0]
    reps = 3
    assert time_to_first_token_ms(engine, prompt, reps=reps) > 0
    stats = engine.stats()
    assert stats.num_prompt_tokens_total == (reps + 1) * len(prompt)
    assert stats.num_prefix_cache_hits_total == 0
    assert stats.num_kv_blocks_free + stats.num_kv_blocks_cached == stats.num_kv_blocks_total
