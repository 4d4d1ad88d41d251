"""Constrained decoding in the engine, on the tiny CPU model with random weights: whatever it
samples must parse and validate (jsonschema, re, the choice list), end with stop once the
grammar is complete and with length when max_tokens cuts it first; logprobs are of the
distribution renormalised over the tokens llguidance allows; seeded rows stay batch-invariant;
compiles are cached, time-limited and leave no request or block behind."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import llguidance
import pytest
import torch

from engine.core.llm_engine import LLMEngine
from engine.ipc.messages import CoreFinish, RequestOutput
from engine.outputs import FinishReason, GenerationDelta
from engine.params import Constraint, ConstraintKind, SamplingParams
from engine.structured.grammar import to_grammar
from tests.conftest import cpu_engine_config
from tests.engine_helpers import output_tokens, paged_logits, run_to_completion
from tests.server import one_intra_op_thread

# Every schema is bounded (strings have maxLength, arrays maxItems, numbers a range), so its
# output has a bounded length and the grammar must complete within MAX_TOKENS: each output must
# end with stop and validate, whatever the random weights sample.
MAX_TOKENS = 400
SCHEMAS: dict[str, dict[str, Any]] = {
    "nested objects": {
        "type": "object", "additionalProperties": False, "required": ["user", "meta"],
        "properties": {
            "user": {"type": "object", "additionalProperties": False,
                     "required": ["name", "age"],
                     "properties": {"name": {"type": "string", "maxLength": 8},
                                    "age": {"type": "integer", "minimum": 0, "maximum": 120}}},
            "meta": {"type": "object", "additionalProperties": False, "required": ["ok"],
                     "properties": {"ok": {"type": "boolean"}}}}},
    "arrays and enums": {
        "type": "object", "additionalProperties": False, "required": ["tags", "level"],
        "properties": {
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                     "minItems": 1, "maxItems": 4},
            "level": {"enum": ["low", "mid", "high", 3, None]}}},
    "anyOf and null": {
        "type": "object", "additionalProperties": False, "required": ["value"],
        "properties": {"value": {"anyOf": [{"type": "integer", "minimum": -5, "maximum": 5},
                                           {"type": "string", "maxLength": 4},
                                           {"type": "null"}]}}},
    "numbers with ranges": {
        "type": "object", "additionalProperties": False, "required": ["count", "ratio"],
        "properties": {"count": {"type": "integer", "minimum": 10, "maximum": 20},
                       "ratio": {"type": "number", "minimum": 0, "maximum": 1,
                                 "multipleOf": 0.25}}},
    "patterns and lengths": {
        "type": "object", "additionalProperties": False, "required": ["code", "word"],
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
                       "word": {"type": "string", "minLength": 2, "maxLength": 5}}},
    "required and optional": {
        "type": "object", "additionalProperties": False, "required": ["id"],
        "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                       "note": {"type": "string", "maxLength": 6},
                       "flag": {"type": "boolean"}}},
    "refs and a top-level array": {
        "$defs": {"point": {"type": "object", "additionalProperties": False,
                            "required": ["x", "y"],
                            "properties": {"x": {"type": "integer", "minimum": 0,
                                                 "maximum": 9},
                                           "y": {"type": "integer", "minimum": 0,
                                                 "maximum": 9}}}},
        "type": "array", "items": {"$ref": "#/$defs/point"}, "minItems": 1, "maxItems": 3},
}
PROMPT_TEXT = "Answer in JSON:"


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> Iterator[LLMEngine]:
    with one_intra_op_thread():
        eng = LLMEngine.from_config(cpu_engine_config(tiny_checkpoint))
        yield eng
        eng.structured.shutdown()


def schema_constraint(schema: dict[str, Any]) -> Constraint:
    return Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(schema), "response_format")


def text_of(deltas: list[GenerationDelta]) -> str:
    return "".join(d.text for d in deltas)


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]
        ) -> dict[str, list[GenerationDelta]]:
    with one_intra_op_thread():
        out = run_to_completion(engine, requests)
    assert_idle(engine)
    return out


def drain(engine: LLMEngine) -> list[RequestOutput]:
    """Step until the engine is idle; every output of the requests already added."""
    deltas = []
    with one_intra_op_thread():
        while engine.has_work:
            deltas += engine.step()
    assert_idle(engine)
    return deltas


def assert_idle(engine: LLMEngine) -> None:
    blocks = engine.scheduler.block_manager
    assert blocks.num_available_blocks == blocks.num_blocks  # free, or cached and unused
    assert not engine.structured.has_compiling and engine.structured.grammar_count == 0


def variants(engine: LLMEngine, constraint: Constraint, max_tokens: int = MAX_TOKENS,
             **extra: Any) -> dict[str, tuple[list[int], SamplingParams]]:
    """Six seeded sampled rows, one hot row and one greedy row, all in one batch."""
    prompt = engine.tokenizer.encode(PROMPT_TEXT)
    out = {f"seed{s}": (prompt, SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=s,
                                               constraint=constraint, **extra))
           for s in range(6)}
    out["hot"] = (prompt, SamplingParams(max_tokens=max_tokens, temperature=2.0, seed=99,
                                         constraint=constraint, **extra))
    out["greedy"] = (prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                            constraint=constraint, **extra))
    return out


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_output_parses_and_validates(engine: LLMEngine, name: str) -> None:
    schema = SCHEMAS[name]
    results = run(engine, variants(engine, schema_constraint(schema)))
    for request_id, deltas in results.items():
        text = text_of(deltas)
        assert deltas[-1].finish_reason == FinishReason.STOP, (request_id, text)
        jsonschema.validate(json.loads(text), schema)


def test_json_object_regex_choice_and_lark(engine: LLMEngine) -> None:
    regex = r"[a-z]{2,4}-\d{2}( [A-Z])?"
    choices = ["yes", "no", "it depends \"quoted\"", "日本語"]
    lark = 'start: "(" item (", " item)* ")"\nitem: /[0-9]{1,2}/ | "x"\n'
    checks = {
        Constraint(ConstraintKind.REGEX, regex, "guided_regex"):
            lambda t: re.fullmatch(regex, t) is not None,
        Constraint(ConstraintKind.CHOICE, json.dumps(choices), "guided_choice"):
            lambda t: t in choices,
        Constraint(ConstraintKind.GRAMMAR, lark, "guided_grammar"):
            lambda t: re.fullmatch(r"\((\d{1,2}|x)(, (\d{1,2}|x))*\)", t) is not None,
    }
    for constraint, ok in checks.items():
        for request_id, deltas in run(engine, variants(engine, constraint, 60)).items():
            text = text_of(deltas)
            if deltas[-1].finish_reason == FinishReason.LENGTH:
                assert constraint.kind == ConstraintKind.GRAMMAR  # the only unbounded one
                continue
            assert ok(text), (constraint.kind, request_id, text)
    objects = run(engine, variants(engine, Constraint(ConstraintKind.JSON_OBJECT), 48))
    for deltas in objects.values():
        text = text_of(deltas)
        if deltas[-1].finish_reason == FinishReason.STOP:
            assert isinstance(json.loads(text), dict)
        else:  # cut by max_tokens: reported as length, and indeed not a whole object
            assert deltas[-1].finish_reason == FinishReason.LENGTH
            assert text.startswith("{") and not _parses(text)


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def test_max_tokens_before_the_grammar_completes_is_length(engine: LLMEngine) -> None:
    schema = {"type": "object", "required": ["text"], "additionalProperties": False,
              "properties": {"text": {"type": "string", "minLength": 40}}}
    for deltas in run(engine, variants(engine, schema_constraint(schema), 12)).values():
        assert deltas[-1].finish_reason == FinishReason.LENGTH
        assert deltas[-1].num_output_tokens == 12
        assert text_of(deltas).startswith('{"text": "') and not _parses(text_of(deltas))


def test_logprobs_are_of_the_masked_distribution(engine: LLMEngine) -> None:
    """The first token's logprobs against transformers-free ground truth: the engine's own
    paged logits renormalised over the tokens llguidance allows first."""
    constraint = Constraint(ConstraintKind.CHOICE, json.dumps(["alpha", "beta", "gamma", "1"]))
    prompt = engine.tokenizer.encode(PROMPT_TEXT)
    deltas = run(engine, {"g": (prompt, SamplingParams(max_tokens=8, temperature=0.0, logprobs=5,
                                                       constraint=constraint))})["g"]
    first = deltas[0].logprobs[0]
    ll_tok = engine.structured.compiler.tokenizer
    matcher = llguidance.LLMatcher(ll_tok, to_grammar(constraint), log_level=0)
    mask = matcher.compute_bitmask()
    allowed = [t for t in range(engine.tokenizer.vocab_size) if mask[t >> 3] >> (t & 7) & 1]
    with one_intra_op_thread():
        logits = paged_logits(engine, prompt)  # [V]
    expected = torch.log_softmax(logits[allowed], dim=-1)
    by_token = dict(zip(allowed, expected.tolist(), strict=True))
    assert first.token_id == allowed[int(expected.argmax())]
    assert math.isclose(first.logprob, by_token[first.token_id], abs_tol=1e-4)
    assert len(first.top) == min(5, len(allowed))
    for token, logprob in first.top:
        assert math.isclose(logprob, by_token[token], abs_tol=1e-4)
    assert text_of(deltas) in ("alpha", "beta", "gamma", "1")


def test_seeded_constrained_rows_are_batch_invariant(engine: LLMEngine) -> None:
    constraint = schema_constraint(SCHEMAS["arrays and enums"])
    prompt = engine.tokenizer.encode(PROMPT_TEXT)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=1234,
                            constraint=constraint)
    alone = run(engine, {"a": (prompt, params)})["a"]
    crowd = variants(engine, schema_constraint(SCHEMAS["nested objects"]))
    crowd["plain"] = (prompt, SamplingParams(max_tokens=30, temperature=1.0))
    crowd["a"] = (prompt, params)
    together = run(engine, crowd)["a"]
    assert output_tokens(alone) == output_tokens(together)


def test_stop_strings_apply_under_a_grammar(engine: LLMEngine) -> None:
    constraint = Constraint(ConstraintKind.REGEX, r"abc;[a-z]{3}")
    prompt = engine.tokenizer.encode(PROMPT_TEXT)
    out = run(engine, {"s": (prompt, SamplingParams(max_tokens=30, temperature=1.0, seed=3,
                                                    stop=(";",), constraint=constraint))})
    assert text_of(out["s"]) == "abc" and out["s"][-1].stop_reason == ";"


def test_compiles_are_cached_and_time_limited(engine: LLMEngine,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    constraint = schema_constraint({"type": "object", "properties": {"q": {"enum": [1, 2]}}})
    first = engine.structured.compiler.submit(constraint)
    assert engine.structured.compiler.submit(constraint) is first
    slow = schema_constraint({"type": "object", "properties": {"r": {"enum": [3, 4]}}})
    structured = engine.structured
    build = structured.compiler._build

    def slow_build(c: Constraint) -> llguidance.LLMatcher:
        time.sleep(0.3)  # a grammar that takes longer than the limit
        return build(c)

    monkeypatch.setattr(structured.compiler, "_build", slow_build)
    monkeypatch.setattr(structured, "config",
                        dataclasses.replace(structured.config, compile_timeout_s=0.05))
    engine.add_request("slow", engine.tokenizer.encode("x"),
                       SamplingParams(max_tokens=4, constraint=slow))
    engine.add_request("plain", engine.tokenizer.encode("x"), SamplingParams(max_tokens=3))
    deltas = drain(engine)
    # The plain request ran while the other compiled, and only it produced output.
    assert {d.request_id for d in deltas} == {"plain"} and deltas[-1].finish is not None
    refused = engine.take_refused()
    assert [r for r, _ in refused] == ["slow"] and refused[0][1].param == "response_format"
    assert "did not compile within" in str(refused[0][1])
    assert engine.take_refused() == []


def test_abort_while_compiling_frees_everything(engine: LLMEngine) -> None:
    constraint = schema_constraint({"type": "object", "properties": {"z": {"enum": [5, 6, 7]}}})
    engine.add_request("gone", engine.tokenizer.encode("x"),
                       SamplingParams(max_tokens=4, constraint=constraint))
    ended = engine.abort_request("gone")
    assert ended is not None and ended.finish == CoreFinish.ABORT
    drain(engine)
    assert not engine.has_work and engine.take_refused() == []


def test_unconstrained_steps_build_no_grammar_work(engine: LLMEngine,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object) -> None:
        raise AssertionError("grammar work in a step without constrained rows")

    monkeypatch.setattr("engine.sampling.sampler.apply_grammar_mask", forbidden)
    monkeypatch.setattr("engine.sampling.metadata.upload_grammar_masks", forbidden)
    prompt = engine.tokenizer.encode(PROMPT_TEXT)
    run(engine, {f"p{i}": (prompt, SamplingParams(max_tokens=5, temperature=1.0, seed=i,
                                                   logprobs=2)) for i in range(4)})
