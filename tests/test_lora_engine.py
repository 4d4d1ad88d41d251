"""LoRA adapters through the real engine against transformers + PEFT on the dequantised base:
several adapters and the base mixed in one batch, more adapters than device slots (swaps),
chunked prefill and preemption; prefix-cache blocks never shared across adapters; unloading
and reloading while requests run."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from engine.core.llm_engine import LLMEngine
from engine.core.runner import StepHandle
from engine.core.scheduler import SchedulerOutput
from engine.ipc.messages import RequestOutput
from engine.lora.spec import LoraConfig, LoraError, LoraSpec
from engine.lora.synth import AdapterSpec
from engine.outputs import GenerationDelta
from engine.params import SamplingParams
from engine.structured.matchers import StepGrammars
from tests.block_invariants import check_block_invariants, check_writes_are_private
from tests.conftest import cpu_engine_config
from tests.engine_helpers import InProcessFront, output_tokens
from tests.lora_helpers import PeftReference, lora_logits, make_adapter

pytest.importorskip("peft")

NEW_TOKENS = 10
ADAPTERS = {
    # every projection, plain scaling
    "all7": AdapterSpec(rank=8, alpha=16, seed=11),
    # a few projections, rsLoRA, a lower rank than the slots
    "qv-down": AdapterSpec(rank=4, alpha=8, seed=12, use_rslora=True,
                           target_modules=("q_proj", "v_proj", "down_proj")),
    # MLP only, one module with its own rank and alpha
    "mlp": AdapterSpec(rank=8, alpha=4, seed=13, target_modules=("gate_proj", "up_proj",
                                                                 "down_proj"),
                       rank_pattern={"gate_proj": 2}, alpha_pattern={"gate_proj": 6.0}),
}


@pytest.fixture(scope="module")
def adapters(lora_root: Path, tiny_checkpoint: Path) -> dict[str, Path]:
    return {name: make_adapter(lora_root, tiny_checkpoint, spec)
            for name, spec in ADAPTERS.items()}


@pytest.fixture(scope="module")
def ref(tiny_checkpoint: Path) -> PeftReference:
    return PeftReference(tiny_checkpoint)


def lora_engine(checkpoint: Path, adapters: dict[str, Path], max_loras: int = 2,
                **overrides: object) -> LLMEngine:
    config = LoraConfig(max_loras=max_loras, max_lora_rank=8,
                        adapters=tuple(LoraSpec(n, str(p)) for n, p in adapters.items()))
    return LLMEngine.from_config(cpu_engine_config(checkpoint, lora=config, **overrides))


def greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def run_checked(engine: LLMEngine, requests: dict[str, tuple[list[int], str | None]],
                max_loras: int, most_adapters: list[int] | None = None
                ) -> dict[str, list[GenerationDelta]]:
    """Run every request to the end, checking after each step the block invariants and that
    the step used at most ``max_loras`` adapters, all resident in distinct slots. Appends to
    ``most_adapters`` the most adapters one step used."""
    sched, launch = engine.scheduler, engine.runner.launch
    seen: list[int] = []

    def launch_step(out: SchedulerOutput,
                    side_inputs: Callable[[], StepGrammars | None] | None = None) -> StepHandle:
        check_writes_are_private(out, sched.block_manager)
        used = {s.seq.lora.id for s in out.scheduled if s.seq.lora is not None}
        assert len(used) <= max_loras
        handle = launch(out, side_inputs)
        resident = engine.runner.lora_slots.resident  # type: ignore[union-attr]
        assert used <= set(resident) and len(set(resident.values())) == len(resident)
        seen.append(len(used))
        return handle

    engine.runner.launch = launch_step  # type: ignore[method-assign]
    front = InProcessFront(engine)
    for rid, (prompt, lora) in requests.items():
        front.add(rid, prompt, greedy(), lora=lora)
    deltas: dict[str, list[GenerationDelta]] = {rid: [] for rid in requests}
    try:
        while engine.has_work:
            for delta in front.step():
                deltas[delta.request_id].append(delta)
            check_block_invariants(sched)
    finally:
        del engine.runner.launch
    if most_adapters is not None:
        most_adapters.append(max(seen))
    blocks = sched.block_manager
    assert blocks.num_available_blocks == blocks.num_blocks
    return deltas


def workload(engine: LLMEngine, seed: int, per_model: int = 2
             ) -> dict[str, tuple[list[int], str | None]]:
    rng = random.Random(seed)
    models: list[str | None] = [None, *ADAPTERS]
    requests = {}
    for i in range(per_model):
        for model in models:
            prompt = [1] + [rng.randrange(3, engine.tokenizer.vocab_size)
                            for _ in range(rng.randrange(5, 40))]
            requests[f"{model}-{i}"] = (prompt, model)
    return requests


def assert_matches_peft(deltas: dict[str, list[GenerationDelta]],
                        requests: dict[str, tuple[list[int], str | None]],
                        adapters: dict[str, Path], ref: PeftReference) -> None:
    for rid, (prompt, lora) in requests.items():
        want = ref.greedy(None if lora is None else adapters[lora], prompt, NEW_TOKENS)
        assert output_tokens(deltas[rid]) == want, rid


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_logits_with_each_adapter_equal_peft_whole_and_chunked(
        tiny_checkpoint: Path, adapters: dict[str, Path], ref: PeftReference) -> None:
    engine = lora_engine(tiny_checkpoint, adapters)
    prompt = engine.tokenizer.encode("Adapters on a four-bit base, chosen per request.")
    for name, path in [(None, None), *adapters.items()]:
        want = ref.last_logits(path, prompt)
        assert relative_error(lora_logits(engine, name, prompt), want) < 1e-4, name
        chunks = [5, 11, len(prompt) - 16]
        assert relative_error(lora_logits(engine, name, prompt, chunks), want) < 1e-4, name
    base = ref.last_logits(None, prompt)
    assert all(relative_error(ref.last_logits(p, prompt), base) > 1e-2
               for p in adapters.values()), "every adapter must change the output"


def test_three_adapters_and_the_base_in_one_batch_over_two_slots(
        tiny_checkpoint: Path, adapters: dict[str, Path], ref: PeftReference) -> None:
    """Eight requests at once over three adapters and the base, with two device slots: steps
    never mix more than two adapters, adapters are swapped in and out, and every request's
    greedy tokens equal PEFT's."""
    engine = lora_engine(tiny_checkpoint, adapters, max_loras=2)
    requests = workload(engine, seed=1)
    most: list[int] = []
    deltas = run_checked(engine, requests, max_loras=2, most_adapters=most)
    assert most == [2]  # steps did mix adapters (and the base)
    assert_matches_peft(deltas, requests, adapters, ref)
    assert engine.runner.lora_slots.num_swaps >= 3  # type: ignore[union-attr]


def test_chunked_prefill_and_preemption_with_adapters(
        tiny_checkpoint: Path, adapters: dict[str, Path], ref: PeftReference) -> None:
    engine = lora_engine(tiny_checkpoint, adapters, max_loras=3, max_num_batched_tokens=32,
                         num_kv_blocks=8, max_model_len=128)
    requests = workload(engine, seed=2)
    deltas = run_checked(engine, requests, max_loras=3)
    assert engine.scheduler.num_preemptions_total > 0
    assert_matches_peft(deltas, requests, adapters, ref)


def test_prefix_cache_entries_are_never_shared_across_adapters(
        tiny_checkpoint: Path, adapters: dict[str, Path], lora_root: Path,
        ref: PeftReference) -> None:
    engine = lora_engine(tiny_checkpoint, adapters, max_loras=3)
    prompt = [1] + list(range(10, 10 + 4 * 16))  # four full blocks

    def cached(rid: str, lora: str | None) -> tuple[int, list[int]]:
        deltas = run_checked(engine, {rid: (prompt, lora)}, max_loras=3)[rid]
        return deltas[-1].num_cached_tokens, output_tokens(deltas)

    assert cached("base", None)[0] == 0
    for name in adapters:  # the same tokens under every adapter: no hit on the base's blocks
        assert cached(f"{name}-first", name)[0] == 0
    for name in [None, *adapters]:  # the same adapter again: its own blocks are found
        assert cached(f"{name}-again", name)[0] == 4 * 16
    # A reload of a name with other weights shares nothing with its former self...
    other = make_adapter(lora_root, tiny_checkpoint, AdapterSpec(rank=8, alpha=16, seed=99))
    engine.load_lora(engine.read_adapter(LoraSpec("all7", str(other))), replace=True)
    hits, tokens = cached("all7-reloaded", "all7")
    assert hits == 0 and tokens == ref.greedy(other, prompt, NEW_TOKENS)
    # ...and the same weights reloaded are the same K/V: found again.
    engine.load_lora(engine.read_adapter(LoraSpec("all7", str(other))), replace=True)
    assert cached("all7-same-weights", "all7")[0] == 4 * 16


def test_unloading_an_adapter_lets_its_running_requests_finish(
        tiny_checkpoint: Path, adapters: dict[str, Path], ref: PeftReference) -> None:
    engine = lora_engine(tiny_checkpoint, {"mlp": adapters["mlp"]}, max_loras=1)
    prompt = [1, 50, 60, 70, 80]
    engine.add_request("running", prompt, greedy(), lora="mlp")
    deltas: list[RequestOutput] = []
    deltas += engine.step()
    engine.unload_lora("mlp")
    assert engine.lora_adapters() == ()
    with pytest.raises(LoraError, match="does not exist") as err:
        engine.add_request("late", prompt, greedy(), lora="mlp")
    assert err.value.code == "lora_not_found"
    while engine.has_work:
        deltas += engine.step()
    assert output_tokens(deltas) == ref.greedy(adapters["mlp"], prompt, NEW_TOKENS)
    lora = engine.runner.lora_slots
    assert lora is not None and lora.resident == {}  # its slot and host copy are gone
    with pytest.raises(LoraError, match="cannot be found"):
        engine.unload_lora("mlp")


def test_requests_for_an_unknown_adapter_or_without_lora_are_refused(
        tiny_checkpoint: Path, adapters: dict[str, Path]) -> None:
    engine = LLMEngine.from_config(cpu_engine_config(tiny_checkpoint))
    with pytest.raises(LoraError) as err:
        engine.add_request("r", [1, 2, 3], greedy(), lora="all7")
    assert err.value.code == "lora_not_found"
    with pytest.raises(LoraError, match="without LoRA support"):
        engine.read_adapter(LoraSpec("all7", str(adapters["all7"])))
    lora = lora_engine(tiny_checkpoint, {"all7": adapters["all7"]})
    with pytest.raises(LoraError, match="already been loaded") as err:
        lora.load_lora(lora.read_adapter(LoraSpec("all7", str(adapters["all7"]))))
    assert err.value.code == "lora_exists"



def test_a_linear_backend_must_declare_lora_support(tiny_checkpoint: Path) -> None:
    from engine.config import ConfigError
    from engine.core.build import make_lora_model_config
    from engine.model.linear.torch_ref import TorchLinearBackend

    class NoLora(TorchLinearBackend):
        supports_lora = False

    config = cpu_engine_config(tiny_checkpoint, lora=LoraConfig())
    backend = NoLora(torch.float32, torch.device("cpu"))
    with pytest.raises(ConfigError, match="cannot serve LoRA adapters"):
        make_lora_model_config(config, backend, torch.device("cpu"))
    assert make_lora_model_config(cpu_engine_config(tiny_checkpoint), backend,
                                  torch.device("cpu")) is None


def test_grammar_constrained_requests_run_with_adapters(tiny_checkpoint: Path,
                                                        adapters: dict[str, Path]) -> None:
    """The two per-row side inputs together: a regex mask on the sampler and an adapter on the
    linears, for rows of different adapters and the base in one batch."""
    import re

    from engine.params import Constraint, ConstraintKind

    engine = lora_engine(tiny_checkpoint, adapters, max_loras=3)
    regex = r"[a-z]{2,4}-\d{2}"
    params = SamplingParams(temperature=0.0, max_tokens=20,
                            constraint=Constraint(ConstraintKind.REGEX, regex, "guided_regex"))
    models: list[str | None] = [None, *ADAPTERS]
    front = InProcessFront(engine)
    for i, model in enumerate(models):
        front.add(f"r{i}", [1, 40 + i, 50, 60], params, lora=model)
    deltas: dict[str, list[GenerationDelta]] = {f"r{i}": [] for i in range(len(models))}
    while engine.has_work:
        for d in front.step():
            deltas[d.request_id].append(d)
    texts = {rid: "".join(d.text for d in ds) for rid, ds in deltas.items()}
    assert all(re.fullmatch(regex, t) for t in texts.values()), texts
    assert len(set(texts.values())) > 1  # the adapters still change what is generated


async def test_loads_and_unloads_through_the_core_process_never_leave_a_caller_waiting(
        tiny_checkpoint: Path, adapters: dict[str, Path]) -> None:
    import asyncio
    import os
    import signal

    from engine.client import EngineDeadError
    from engine.frontend.client import EngineProcessClient

    engine = await asyncio.to_thread(EngineProcessClient.launch, cpu_engine_config(
        tiny_checkpoint, lora=LoraConfig(max_loras=1, max_lora_rank=8,
                                         allow_runtime_updates=True)))
    await engine.start()
    try:
        info = await engine.load_lora(LoraSpec("mlp", str(adapters["mlp"])))
        assert info.rank == 8 and engine.lora_adapters() == (info,)
        with pytest.raises(LoraError, match="already been loaded"):
            await engine.load_lora(LoraSpec("mlp", str(adapters["mlp"])))
        with pytest.raises(LoraError) as missing:
            async for _ in engine.generate([1, 5, 6], SamplingParams(max_tokens=2), "x",
                                           lora="nope"):
                pass
        assert missing.value.code == "lora_not_found"
        await engine.unload_lora("mlp")
        assert engine.lora_adapters() == ()
        # A core that dies with a load unanswered fails it rather than leaving it waiting:
        # stopped first, so that the load cannot be answered before the kill.
        assert engine.pid is not None
        os.kill(engine.pid, signal.SIGSTOP)
        pending = asyncio.ensure_future(engine.load_lora(LoraSpec("all7",
                                                                  str(adapters["all7"]))))
        await asyncio.sleep(0.2)
        assert not pending.done()
        os.kill(engine.pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(pending, 30)
    finally:
        await engine.shutdown()
    with pytest.raises(EngineDeadError):
        await engine.load_lora(LoraSpec("mlp", str(adapters["mlp"])))
