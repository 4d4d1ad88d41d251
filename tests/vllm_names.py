"""Checks that a /metrics exposition shows every vLLM alias (app/vllm_metrics.py) with exactly
the samples of its gptq_* family: same type, same values, vLLM's label names, plus the
model_name and engine labels. Worked out here from the gptq samples, independently of how the
server renames them."""

from __future__ import annotations

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from app.vllm_metrics import VLLM_ALIASES, Alias

SampleKey = tuple[str, frozenset[tuple[str, str]]]


def families(exposition: str) -> dict[str, Metric]:
    return {f.name: f for f in text_string_to_metric_families(exposition)}


def expected_alias_samples(exposition: str, alias: Alias, model_name: str
                           ) -> dict[SampleKey, float]:
    ours = families(exposition)[alias.ours]
    out: dict[SampleKey, float] = {}
    for s in ours.samples:
        labels = {alias.labels.get(k, k): v for k, v in s.labels.items()}
        labels |= {"model_name": model_name, "engine": "0"}
        out[(alias.vllm + s.name[len(alias.ours):], frozenset(labels.items()))] = s.value
    return out


def alias_problems(exposition: str, model_name: str,
                   aliases: tuple[Alias, ...] = VLLM_ALIASES) -> list[str]:
    """Why the exposition's vLLM names do not mirror ours; [] when every alias does."""
    found = families(exposition)
    problems = []
    for alias in aliases:
        ours, theirs = found.get(alias.ours), found.get(alias.vllm)
        if ours is None or theirs is None:
            problems.append(f"{alias.vllm} or {alias.ours} is not exported")
            continue
        if theirs.type != ours.type:
            problems.append(f"{alias.vllm} is a {theirs.type}, {alias.ours} a {ours.type}")
        actual = {(s.name, frozenset(s.labels.items())): s.value for s in theirs.samples}
        expected = expected_alias_samples(exposition, alias, model_name)
        if actual != expected:
            diff = set(actual.items()) ^ set(expected.items())
            problems.append(f"{alias.vllm} differs from {alias.ours}: {sorted(diff)[:4]}")
    return problems
