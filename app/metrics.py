"""Prometheus metrics: one registry per app (no module globals).

Engine-side numbers (queue sizes, KV usage, token and step counters) are read from
``EngineClient.stats()`` at scrape time by a custom collector; per-request latencies are
observed by the routes as deltas arrive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engine.outputs import EngineStats, ModelInfo

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                    1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self._stats()
        if s is None:
            return
        yield _gauge("gptq_num_requests_running", "Requests in the running batch.", s.num_running)
        yield _gauge("gptq_num_requests_waiting", "Requests waiting to be scheduled.",
                     s.num_waiting)
        yield _gauge("gptq_kv_cache_usage_ratio", "Fraction of KV-cache blocks held by "
                     "running requests (0-1).", s.kv_cache_usage)
        yield _gauge("gptq_kv_cache_blocks_total", "KV-cache blocks in the pool.",
                     s.num_kv_blocks_total)
        yield _gauge("gptq_kv_cache_blocks_free", "KV-cache blocks held by no request and "
                     "holding nothing reusable.", s.num_kv_blocks_free)
        yield _gauge("gptq_kv_cache_blocks_cached", "KV-cache blocks held by no request that "
                     "keep K/V later prompts may reuse (evicted least recently used first).",
                     s.num_kv_blocks_cached)
        yield _counter("gptq_prefix_cache_queries", "Prompt tokens looked up in the prefix "
                       "cache.", s.num_prefix_cache_queries_total)
        yield _counter("gptq_prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                       s.num_prefix_cache_hits_total)
        yield _counter("gptq_prompt_tokens", "Prompt tokens of requests whose prefill "
                       "completed (cached ones included).", s.num_prompt_tokens_total)
        yield _counter("gptq_generation_tokens", "Tokens generated.",
                       s.num_generation_tokens_total)
        yield _counter("gptq_num_preemptions", "Sequences preempted for KV-cache space.",
                       s.num_preemptions_total)
        yield _counter("gptq_engine_steps", "Engine steps run.", s.num_steps_total)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


class Metrics:
    def __init__(self, stats: Callable[[], EngineStats | None]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        r.register(EngineCollector(stats))
        self.request_success = Counter("gptq_request_success", "Finished requests by reason.",
                                       ["finish_reason"], registry=r)
        self.requests_rejected = Counter("gptq_requests_rejected", "Requests refused before "
                                         "reaching the engine, by reason.", ["reason"],
                                         registry=r)
        self.http_requests = Counter("gptq_http_requests", "HTTP requests by route template, "
                                     "method and status.", ["route", "method", "status"],
                                     registry=r)
        self.http_duration = Histogram("gptq_http_request_duration_seconds", "HTTP request "
                                       "duration (streams: until the last byte).", ["route"],
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("gptq_time_to_first_token_seconds", "Time to first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("gptq_inter_token_latency_seconds", "Time between tokens of a "
                             "request.", buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("gptq_e2e_request_latency_seconds", "Request latency from arrival "
                             "to the last token.", buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("gptq_request_queue_time_seconds", "Time from arrival to "
                                    "first scheduled.", buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Histogram("gptq_request_prompt_tokens", "Prompt tokens per "
                                       "request.", buckets=_TOKEN_BUCKETS, registry=r)
        self.generation_tokens = Histogram("gptq_request_generation_tokens", "Generated tokens "
                                           "per request.", buckets=_TOKEN_BUCKETS, registry=r)
        self.model_info = Gauge("gptq_model_info", "The loaded model (value 1).",
                                ["model", "revision", "bits", "group_size", "act_order",
                                 "linear_backend", "attention_backend"], registry=r)
        self.ready = Gauge("gptq_ready", "1 when the server accepts work.", registry=r)
        self.draining = Gauge("gptq_draining", "1 while the server drains on shutdown.",
                              registry=r)

    def set_model_info(self, info: ModelInfo) -> None:
        self.model_info.labels(
            model=info.model, revision=info.revision or "", bits=str(info.bits),
            group_size=str(info.group_size if info.group_size is not None else -1),
            act_order=str(info.act_order).lower(), linear_backend=info.linear_backend,
            attention_backend=info.attention_backend).set(1)
