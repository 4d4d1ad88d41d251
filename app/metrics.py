"""Prometheus metrics: one registry per app (no module globals).

Engine-side numbers (queue sizes, KV usage, token and step counters) are read from
``EngineClient.stats()`` at scrape time by a custom collector; per-request latencies are
observed by the routes as deltas arrive. /metrics exposes the registry through
``exposition``, which adds the same samples under vLLM's names (app/vllm_metrics.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from app.lora_metrics import LoraCollector, LoraView
from app.settings import Settings
from app.vllm_metrics import (
    VLLM_ITL_BUCKETS,
    VLLM_REQUEST_LATENCY_BUCKETS,
    VLLM_TOKEN_BUCKETS,
    VLLM_TTFT_BUCKETS,
    CacheConfig,
    VllmExposition,
)
from engine.outputs import EngineStats, FinishReason, ModelInfo

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                    1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def _with(*bucket_sets: tuple[float, ...]) -> tuple[float, ...]:
    """Our boundaries plus vLLM's for the same metric, so each of its ``le`` values exists."""
    return tuple(sorted({b for buckets in bucket_sets for b in buckets}))


TTFT_BUCKETS = _with(_LATENCY_BUCKETS, VLLM_TTFT_BUCKETS)
ITL_BUCKETS = _with(_LATENCY_BUCKETS, VLLM_ITL_BUCKETS)
REQUEST_BUCKETS = _with(_LATENCY_BUCKETS, VLLM_REQUEST_LATENCY_BUCKETS)
TOKEN_BUCKETS = _with(_TOKEN_BUCKETS, VLLM_TOKEN_BUCKETS)


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
    def __init__(self, stats: Callable[[], EngineStats | None], settings: Settings,
                 lora: Callable[[], LoraView | None] = lambda: None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        r.register(EngineCollector(stats))
        r.register(LoraCollector(lora, settings.model_names[0]))
        self.exposition = CollectorRegistry(auto_describe=False)
        self.exposition.register(VllmExposition(
            r, settings.model_names[0],
            CacheConfig(settings.block_size, settings.dtype, settings.gpu_memory_utilization,
                        settings.prefix_caching),
            enabled=settings.vllm_metrics))
        # By the request's "model": the base model's served name or a LoRA adapter's.
        self.model_requests = Counter("gptq_model_requests", "Finished requests by model "
                                      "name (the base model or a LoRA adapter).", ["model"],
                                      registry=r)
        self.model_prompt_tokens = Counter("gptq_model_prompt_tokens", "Prompt tokens of "
                                           "finished requests by model name (base or LoRA "
                                           "adapter).", ["model"], registry=r)
        self.model_generation_tokens = Counter("gptq_model_generation_tokens", "Generated "
                                               "tokens of finished requests by model name "
                                               "(base or LoRA adapter).", ["model"], registry=r)
        self.request_success = Counter("gptq_request_success", "Finished requests by reason.",
                                       ["finish_reason"], registry=r)
        for reason in FinishReason:  # every reason exported from the start, at 0
            self.request_success.labels(finish_reason=str(reason))
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
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("gptq_inter_token_latency_seconds", "Time between tokens of a "
                             "request.", buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("gptq_e2e_request_latency_seconds", "Request latency from arrival "
                             "to the last token.", buckets=REQUEST_BUCKETS, registry=r)
        # The engine's phases of each finished request (engine timestamps; see
        # Generation._observe_phases for what a preemption counts as).
        self.queue_time = Histogram("gptq_request_queue_time_seconds", "Time from arrival to "
                                    "first scheduled.", buckets=REQUEST_BUCKETS, registry=r)
        self.prefill_time = Histogram("gptq_request_prefill_time_seconds", "Time from first "
                                      "scheduled to the first token.", buckets=REQUEST_BUCKETS,
                                      registry=r)
        self.decode_time = Histogram("gptq_request_decode_time_seconds", "Time from the first "
                                     "token to the last.", buckets=REQUEST_BUCKETS, registry=r)
        self.inference_time = Histogram("gptq_request_inference_time_seconds", "Time from first "
                                        "scheduled to the last token.",
                                        buckets=REQUEST_BUCKETS, registry=r)
        self.time_per_output_token = Histogram(
            "gptq_request_time_per_output_token_seconds", "Each request's decode time over "
            "its tokens after the first (0 for a request of one token).", buckets=ITL_BUCKETS,
            registry=r)
        self.prompt_tokens = Histogram("gptq_request_prompt_tokens", "Prompt tokens per "
                                       "request.", buckets=TOKEN_BUCKETS, registry=r)
        self.generation_tokens = Histogram("gptq_request_generation_tokens", "Generated tokens "
                                           "per request.", buckets=TOKEN_BUCKETS, registry=r)
        self.model_info = Gauge("gptq_model_info", "The loaded model (value 1).",
                                ["model", "revision", "bits", "group_size", "act_order",
                                 "linear_backend", "attention_backend"], registry=r)
        self.ready = Gauge("gptq_ready", "1 when the server accepts work.", registry=r)
        self.draining = Gauge("gptq_draining", "1 while the server drains on shutdown.",
                              registry=r)

    def observe_model_request(self, model: str, prompt_tokens: int,
                              generation_tokens: int) -> None:
        self.model_requests.labels(model=model).inc()
        self.model_prompt_tokens.labels(model=model).inc(prompt_tokens)
        self.model_generation_tokens.labels(model=model).inc(generation_tokens)

    def set_model_info(self, info: ModelInfo) -> None:
        self.model_info.labels(
            model=info.model, revision=info.revision or "", bits=str(info.bits),
            group_size=str(info.group_size if info.group_size is not None else -1),
            act_order=str(info.act_order).lower(), linear_backend=info.linear_backend,
            attention_backend=info.attention_backend).set(1)
