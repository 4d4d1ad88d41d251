"""The step graphs (engine/model/step_graphs.py) on the GPU: prompts, prefill chunks and mixed
steps replayed from piecewise CUDA graphs give what the eager forward gives, padding rows
write only the sink block, and a whole engine generates the same tokens either way.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.core.batch import build_step_inputs
from engine.params import SamplingParams
from tests.engine_helpers import logits_after, small_cuda_engine, synth_tiny_checkpoint

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

LAYOUTS = [(4, 128, False), (4, 32, True), (8, 128, True)]


@pytest.fixture(scope="module", params=LAYOUTS, ids=lambda p: f"{p[0]}bit-g{p[1]}-ao{p[2]}")
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    bits, group, act_order = request.param
    return synth_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny-{bits}-{group}-{act_order}"),
                                 request.param, seed=bits + group + 7)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite values"
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def test_buckets_cover_the_step_budget(checkpoint: Path) -> None:
    engine = small_cuda_engine(checkpoint)
    graphs = engine.runner.step_graphs
    assert graphs is not None and graphs.max_tokens == 256
    assert graphs.bucket_for(1) == 16 and graphs.bucket_for(17) == 32
    assert graphs.bucket_for(129) == 192 and graphs.bucket_for(256) == 256
    assert graphs.bucket_for(257) is None
    assert small_cuda_engine(checkpoint, cuda_graph_max_tokens=0).runner.step_graphs is None
    assert small_cuda_engine(checkpoint, cuda_graphs=False).runner.step_graphs is None


@pytest.mark.parametrize("steps", [[77], [16, 16, 16, 29], [70, 1, 1, 1, 1, 1, 1, 1],
                                   [200, 56, 44], [3, 130]])
def test_prefill_through_step_graphs_matches_eager(checkpoint: Path, steps: list[int]) -> None:
    """Chunked prompts (fresh prompts on SDPA, later chunks on the paged kernel, sizes inside
    a bucket and at its edge) give the eager engine's logits."""
    graphed = small_cuda_engine(checkpoint)
    eager = small_cuda_engine(checkpoint, cuda_graph_max_tokens=0)
    assert graphed.runner.step_graphs is not None and eager.runner.step_graphs is None
    gen = torch.Generator().manual_seed(sum(steps))
    prompt = torch.randint(3, graphed.tokenizer.vocab_size, (sum(steps),),
                           generator=gen).tolist()
    assert rel_err(logits_after(graphed, prompt, steps), logits_after(eager, prompt, steps)) \
        < 5e-3


def _check_replay(engine, out) -> None:
    """Replay the scheduled step ``out`` through the step graphs and run it eagerly from the
    same cache: the same hidden states, and K/V writes only on the step's own slots (padding
    rows write the sink block, past the pool)."""
    runner = engine.runner
    inputs = build_step_inputs(out, engine.scheduler.block_manager.block_size,
                               runner.model.device)
    before = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    eager = runner.model.forward(inputs.input_ids, inputs.positions, runner.kv_caches,
                                 inputs.meta).clone()
    eager_cache = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    for (k, v), (k0, v0) in zip(runner.kv_caches, before, strict=True):
        k.copy_(k0)
        v.copy_(v0)
    replayed = runner.step_graphs.run(inputs.input_ids, inputs.positions, inputs.meta)
    assert replayed.shape == eager.shape
    assert rel_err(replayed, eager) < 5e-3
    pool = engine.scheduler.block_manager.num_blocks
    written = torch.zeros(pool * 16, dtype=torch.bool, device=replayed.device)
    written[inputs.meta.slot_mapping] = True
    for (k, v), (k0, v0), (ke, ve) in zip(runner.kv_caches, before, eager_cache, strict=True):
        for cache, old, ref in ((k, k0, ke), (v, v0, ve)):
            flat, flat_old = cache[:pool].flatten(0, 1), old[:pool].flatten(0, 1)
            assert torch.equal(flat[~written], flat_old[~written])
            assert rel_err(flat[written], ref[:pool].flatten(0, 1)[written]) < 5e-3


def test_mixed_step_matches_eager_and_writes_only_its_slots(checkpoint: Path) -> None:
    """One step with decode rows, a prompt's later chunk and a fresh prompt (50 tokens, padded
    to the 64-token bucket), through the pieces with attention in between."""
    engine = small_cuda_engine(checkpoint, overlap_steps=False, max_num_batched_tokens=64)
    graphs = engine.runner.step_graphs
    assert graphs is not None
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    engine.add_request("a", list(range(3, 40)), greedy)
    engine.add_request("b", list(range(5, 30)), greedy)
    engine.step()  # both prompts (62 tokens)
    engine.step()  # one decode step each
    engine.add_request("d", list(range(9, 99)), greedy)
    engine.step()  # two decodes and d's first 62 tokens
    engine.add_request("c", list(range(7, 27)), greedy)
    out = engine.scheduler.schedule()  # two decodes, d's last 28 tokens, c's 20
    assert sorted(s.num_new_tokens for s in out.scheduled) == [1, 1, 20, 28]
    assert graphs.bucket_for(50) == 64
    meta = build_step_inputs(out, 16, engine.runner.model.device).meta
    assert not graphs.is_one_prompt(meta)
    _check_replay(engine, out)


@pytest.mark.parametrize("length", [37, 64, 2])
def test_one_prompt_step_replays_the_whole_forward(checkpoint: Path, length: int) -> None:
    """A step that is one fresh prompt (padded to its bucket, or filling it) replays the
    whole-forward graph, attention inside, with the eager forward's results."""
    engine = small_cuda_engine(checkpoint, overlap_steps=False)
    graphs = engine.runner.step_graphs
    assert graphs is not None
    engine.add_request("p", list(range(11, 11 + length)),
                       SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    out = engine.scheduler.schedule()
    meta = build_step_inputs(out, 16, engine.runner.model.device).meta
    assert graphs.is_one_prompt(meta)
    _check_replay(engine, out)


def test_engine_generates_the_same_tokens_with_and_without_step_graphs(checkpoint: Path) -> None:
    """Requests of many sizes arriving together (prefills beside decodes, chunked prompts),
    greedy: the same tokens from an engine with step graphs as from one without."""
    from tests.engine_helpers import output_tokens, run_to_completion

    prompts = [list(range(3 + i, 3 + i + n)) for i, n in enumerate((1, 15, 16, 17, 100, 300))]
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    tokens = []
    for max_tokens in (512, 0):
        engine = small_cuda_engine(checkpoint, cuda_graph_max_tokens=max_tokens)
        deltas = run_to_completion(engine, {f"r{i}": (p, greedy) for i, p in enumerate(prompts)})
        tokens.append({rid: output_tokens(d) for rid, d in deltas.items()})
        blocks = engine.scheduler.block_manager
        assert blocks.num_available_blocks == blocks.num_blocks  # every block came back
    assert all(len(t) == 12 for t in tokens[0].values())
    assert tokens[0] == tokens[1]
