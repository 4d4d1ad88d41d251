"""vLLM metric names (app/vllm_metrics.py) on an app's own registry, without a server: every
alias mirrors its gptq_* family sample for sample, the engine's gauges come from one stats
snapshot per scrape, our buckets hold vLLM's boundaries, and the setting turns them off. The
live server's names are checked after real traffic in tests/test_api_metrics.py."""

from __future__ import annotations

import itertools

import msgspec
from prometheus_client import generate_latest

from app.lora_metrics import LoraView
from app.metrics import ITL_BUCKETS, REQUEST_BUCKETS, TOKEN_BUCKETS, TTFT_BUCKETS, Metrics
from app.settings import Settings
from app.vllm_metrics import (
    VLLM_ALIASES,
    VLLM_ITL_BUCKETS,
    VLLM_REQUEST_LATENCY_BUCKETS,
    VLLM_TOKEN_BUCKETS,
    VLLM_TTFT_BUCKETS,
)
from engine.outputs import EngineStats
from tests.vllm_names import alias_problems, families

# The names a vLLM user's dashboards, alerts and autoscalers read (the list).
REQUIRED = {"vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
            "vllm:kv_cache_usage_perc": "gauge", "vllm:time_to_first_token_seconds": "histogram",
            "vllm:inter_token_latency_seconds": "histogram",
            "vllm:e2e_request_latency_seconds": "histogram", "vllm:prompt_tokens": "counter",
            "vllm:generation_tokens": "counter", "vllm:num_preemptions": "counter",
            "vllm:request_success": "counter"}


class MovingStats:
    """An engine whose every stats() call returns a different snapshot, as a running engine's
    would between two reads."""

    def __init__(self) -> None:
        self.calls = itertools.count(1)

    def __call__(self) -> EngineStats:
        n = next(self.calls)
        # Every count n (so new fields need no change here), the pool partly used.
        values: dict[str, object] = {f.name: n for f in msgspec.structs.fields(EngineStats)}
        values |= {"num_kv_blocks_total": 100, "num_kv_blocks_free": 100 - 3 * n,
                   "loop_alive": True}
        return EngineStats(**values)  # type: ignore[arg-type]


def metrics(**settings: object) -> Metrics:
    lora = LoraView((), ("sql",), ("sql", "orca"), max_loras=2)
    return Metrics(MovingStats(), Settings(served_model_name=["tiny"], **settings),
                   lambda: lora)


def exposition(m: Metrics) -> str:
    return generate_latest(m.exposition).decode()


def test_every_alias_mirrors_its_family_after_observations() -> None:
    m = metrics()
    m.request_success.labels(finish_reason="length").inc(3)
    m.request_success.labels(finish_reason="stop").inc()
    for value in (0.0004, 0.03, 0.3, 7.0, 3000.0):
        for histogram in (m.ttft, m.itl, m.e2e, m.queue_time, m.prefill_time, m.decode_time,
                          m.inference_time, m.time_per_output_token):
            histogram.observe(value)
    for tokens in (1, 17, 4000):
        m.prompt_tokens.observe(tokens)
        m.generation_tokens.observe(tokens)
    text = exposition(m)
    assert alias_problems(text, "tiny") == []
    found = families(text)
    for name, kind in REQUIRED.items():
        assert found[name].type == kind, name
        assert all(s.labels["model_name"] == "tiny" for s in found[name].samples), name
    success = {s.labels["finished_reason"]: s.value
               for s in found["vllm:request_success"].samples if s.name.endswith("_total")}
    assert success == {"stop": 1, "length": 3, "abort": 0, "error": 0}


def test_engine_gauges_agree_although_the_engine_moves_between_reads() -> None:
    m = metrics()
    text = exposition(m)
    assert alias_problems(text, "tiny") == []
    found = families(text)
    assert found["vllm:num_requests_running"].samples[0].value \
        == found["gptq_num_requests_running"].samples[0].value


def test_cache_config_info_reports_the_pool() -> None:
    info = families(exposition(metrics(block_size=32)))["vllm:cache_config_info"].samples
    assert [(s.labels, s.value) for s in info] == [
        ({"block_size": "32", "cache_dtype": "auto", "gpu_memory_utilization": "0.9",
          "enable_prefix_caching": "True", "num_gpu_blocks": "100", "engine": "0"}, 1.0)]


def test_before_the_engine_loads_only_request_families_are_shown() -> None:
    m = Metrics(lambda: None, Settings(served_model_name=["tiny"]))
    found = families(exposition(m))
    assert "vllm:num_requests_running" not in found and "vllm:cache_config_info" not in found
    assert "vllm:e2e_request_latency_seconds" in found


def test_the_setting_turns_the_vllm_names_off() -> None:
    text = exposition(metrics(vllm_metrics=False))
    assert "vllm:" not in text and "gptq_num_requests_running" in text


def test_our_buckets_hold_every_vllm_boundary() -> None:
    for ours, theirs in ((TTFT_BUCKETS, VLLM_TTFT_BUCKETS), (ITL_BUCKETS, VLLM_ITL_BUCKETS),
                         (REQUEST_BUCKETS, VLLM_REQUEST_LATENCY_BUCKETS),
                         (TOKEN_BUCKETS, VLLM_TOKEN_BUCKETS)):
        assert set(theirs) <= set(ours) and list(ours) == sorted(ours)


def test_each_alias_names_an_existing_family_once() -> None:
    found = families(exposition(metrics()))
    assert len({a.vllm for a in VLLM_ALIASES}) == len(VLLM_ALIASES)
    assert all(a.ours in found and a.vllm.startswith("vllm:") for a in VLLM_ALIASES)


def test_the_lora_requests_info_has_vllms_labels() -> None:
    text = exposition(metrics())
    assert ('vllm:lora_requests_info{engine="0",max_lora="2",model_name="tiny",'
            'running_lora_adapters="sql",waiting_lora_adapters="sql,orca"} 1.0') in text
