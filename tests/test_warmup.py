"""The engine's warm-up: what it plans to run on a GPU (every step size of the linear plan's
ladder, every decode bucket) and on the CPU, and that it leaves the engine as it found it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine.core.llm_engine import LLMEngine
from engine.core.scheduler import SchedulerConfig
from engine.core.warmup import SAMPLER_PATHS, prefill_sizes, warm_up, warmup_sizes
from engine.model.cuda_graphs import batch_buckets
from engine.params import SamplingParams
from tests.conftest import cpu_engine_config
from tests.engine_helpers import run_to_completion


def gpu_like(budget: int, max_model_len: int, max_num_seqs: int) -> SimpleNamespace:
    """What warmup_sizes reads of an engine on a GPU with decode graphs."""
    return SimpleNamespace(
        runner=SimpleNamespace(graphs=SimpleNamespace(buckets=batch_buckets(max_num_seqs)),
                               model=SimpleNamespace(device=torch.device("cuda"))),
        scheduler=SimpleNamespace(config=SchedulerConfig(max_num_seqs, budget, max_model_len)))


@pytest.mark.parametrize(("budget", "max_len"), [(2048, 4096), (512, 300), (100, 4096)])
def test_on_a_gpu_every_plan_size_and_every_decode_bucket_runs(budget: int,
                                                               max_len: int) -> None:
    plan = pytest.importorskip("engine.model.linear.plan")
    prefills, decodes = warmup_sizes(gpu_like(budget, max_len, 64))  # type: ignore[arg-type]
    limit = min(budget, max_len - 1)
    # Each plan entry a step can reach, and the largest step.
    assert {s for s in plan.LADDER if s <= limit} <= set(prefills)
    assert max(prefills) == limit
    # Triton specialises integer arguments on == 1, % 16 == 0 and neither: all three occur.
    assert 1 in prefills and any(s % 16 == 0 for s in prefills) \
        and any(s > 1 and s % 16 for s in prefills)
    assert decodes == batch_buckets(64)
    assert prefill_sizes(16, 4096) == [1, 2, 4, 8, 16]


def test_warm_up_runs_every_sampler_path_and_leaves_the_engine_clean(
        tiny_checkpoint: Path) -> None:
    engine = LLMEngine.from_config(cpu_engine_config(tiny_checkpoint))
    report = warm_up(engine)
    assert report.prefill_sizes == (16,)
    assert report.decode_sizes == (len(SAMPLER_PATHS),)  # a row of every path
    stats = engine.stats()
    assert stats.num_kv_blocks_free == stats.num_kv_blocks_total  # nothing cached either
    assert (stats.num_steps_total, stats.num_generation_tokens_total,
            stats.num_prompt_tokens_total, stats.num_prefix_cache_queries_total) == (0, 0, 0, 0)
    assert engine.scheduler.block_manager.enable_caching and not engine.has_work
    # And the engine serves as before: a prompt's blocks are cached again after it ends.
    prompt = [1] + list(range(10, 50))
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    first = run_to_completion(engine, {"a": (prompt, params)})["a"]
    again = run_to_completion(engine, {"b": (prompt, params)})["b"]
    assert again[-1].num_cached_tokens == 32
    assert [d.token_ids for d in first] == [d.token_ids for d in again]


def test_with_an_adapter_loaded_the_warm_up_runs_its_rows_too(
        tiny_checkpoint: Path, lora_root: Path) -> None:
    pytest.importorskip("peft")
    from engine.lora.spec import LoraConfig, LoraSpec
    from engine.lora.synth import AdapterSpec
    from tests.lora_helpers import make_adapter

    folder = make_adapter(lora_root, tiny_checkpoint, AdapterSpec(rank=4, alpha=8, seed=3))
    engine = LLMEngine.from_config(cpu_engine_config(tiny_checkpoint, lora=LoraConfig(
        max_loras=1, max_lora_rank=4, adapters=(LoraSpec("a", str(folder)),))))
    slots = engine.runner.lora_slots
    assert slots is not None and slots.resident == {}
    added: list[str | None] = []
    add = engine.add_request

    def recording(*args: object, **kwargs: object) -> None:
        added.append(kwargs.get("lora"))  # type: ignore[arg-type]
        add(*args, **kwargs)  # type: ignore[arg-type]

    engine.add_request = recording  # type: ignore[method-assign]
    warm_up(engine)
    del engine.add_request
    # Prefills with and without the adapter, decode rows of both kinds in one batch.
    assert added.count("a") >= 1 + len(SAMPLER_PATHS) // 2 and None in added
    assert len(slots.resident) == 1  # the adapter was made resident: its rows ran
    assert engine.stats().num_steps_total == 0 and not engine.has_work
    assert engine.lora_adapters()[0].name == "a"
