"""Our metrics under vLLM's names, for dashboards, alerts, autoscalers (KEDA, prometheus-adapter)
and benchmark tools written against vLLM.

Each vLLM metric is an alias of one of ours, listed in VLLM_ALIASES: at scrape time the
exposition re-emits the gptq_* family's samples under the vLLM name, with vLLM's label names
and its ``model_name`` (the served model name) and ``engine`` ("0": one engine) labels. Both
names come from the same samples of the same collection pass, so they agree by construction,
also for the engine's gauges, which are read once per scrape. Adding an alias is one line.

Our histograms' buckets include every boundary vLLM uses for the same metric (app/metrics.py),
so a query on a vLLM ``le`` value finds its bucket here too. Only metrics whose meaning matches
vLLM's are aliased (docs/api.md, "vLLM metric names", lists them and what is not supplied).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# vLLM's histogram boundaries (vllm/v1/metrics/loggers.py).
VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                     5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
VLLM_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)
VLLM_REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                                40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# vLLM's token-count histograms use 1-2-5 steps up to max_model_len; these reach 50000.
VLLM_TOKEN_BUCKETS = tuple(m * 10**e for e in range(5) for m in (1, 2, 5))


@dataclass(frozen=True)
class Alias:
    """vLLM's family ``vllm`` is our family ``ours`` (family names: a counter's without
    _total), with our label names renamed as ``labels`` says."""

    vllm: str
    ours: str
    labels: Mapping[str, str] = field(default_factory=dict)


VLLM_ALIASES: tuple[Alias, ...] = (
    Alias("vllm:num_requests_running", "gptq_num_requests_running"),
    Alias("vllm:num_requests_waiting", "gptq_num_requests_waiting"),
    Alias("vllm:kv_cache_usage_perc", "gptq_kv_cache_usage_ratio"),
    Alias("vllm:gpu_cache_usage_perc", "gptq_kv_cache_usage_ratio"),  # its name before 0.10
    Alias("vllm:prompt_tokens", "gptq_prompt_tokens"),
    Alias("vllm:generation_tokens", "gptq_generation_tokens"),
    Alias("vllm:num_preemptions", "gptq_num_preemptions"),
    Alias("vllm:request_success", "gptq_request_success", {"finish_reason": "finished_reason"}),
    Alias("vllm:time_to_first_token_seconds", "gptq_time_to_first_token_seconds"),
    Alias("vllm:inter_token_latency_seconds", "gptq_inter_token_latency_seconds"),
    # The same histogram's name before vLLM 0.11, which older dashboards still read.
    Alias("vllm:time_per_output_token_seconds", "gptq_inter_token_latency_seconds"),
    Alias("vllm:e2e_request_latency_seconds", "gptq_e2e_request_latency_seconds"),
    Alias("vllm:request_queue_time_seconds", "gptq_request_queue_time_seconds"),
    Alias("vllm:request_prefill_time_seconds", "gptq_request_prefill_time_seconds"),
    Alias("vllm:request_decode_time_seconds", "gptq_request_decode_time_seconds"),
    Alias("vllm:request_inference_time_seconds", "gptq_request_inference_time_seconds"),
    Alias("vllm:request_time_per_output_token_seconds",
          "gptq_request_time_per_output_token_seconds"),
    Alias("vllm:request_prompt_tokens", "gptq_request_prompt_tokens"),
    Alias("vllm:request_generation_tokens", "gptq_request_generation_tokens"),
    Alias("vllm:prefix_cache_queries", "gptq_prefix_cache_queries"),
    Alias("vllm:prefix_cache_hits", "gptq_prefix_cache_hits"),
    # The same labels as vLLM's; the value is 1 where vLLM's is the time of its last update.
    Alias("vllm:lora_requests_info", "gptq_lora_requests_info"),
)

ENGINE_INDEX = "0"  # vLLM's `engine` label: we run one engine per server


@dataclass(frozen=True)
class CacheConfig:
    """What vllm:cache_config_info reports besides the pool size (read from the scrape)."""

    block_size: int
    cache_dtype: str  # "auto": the model's activation dtype, as in vLLM
    gpu_memory_utilization: float
    enable_prefix_caching: bool


class VllmExposition(Collector):
    """The collector /metrics exposes: every family of ``base`` once, then, when ``enabled``,
    the vLLM aliases of those families and vllm:cache_config_info, all from that one pass."""

    def __init__(self, base: CollectorRegistry, model_name: str, cache: CacheConfig,
                 enabled: bool, aliases: tuple[Alias, ...] = VLLM_ALIASES) -> None:
        self.base = base
        self.constant_labels = {"model_name": model_name, "engine": ENGINE_INDEX}
        self.cache = cache
        self.enabled = enabled
        self.aliases = aliases

    def collect(self) -> Iterator[Metric]:
        families = list(self.base.collect())
        yield from families
        if not self.enabled:
            return
        by_name = {family.name: family for family in families}
        for alias in self.aliases:
            family = by_name.get(alias.ours)
            if family is not None:  # engine families appear once the model is loaded
                yield self._renamed(family, alias)
        blocks = by_name.get("gptq_kv_cache_blocks_total")
        if blocks is not None and blocks.samples:
            yield self._cache_config_info(int(blocks.samples[0].value))

    def _renamed(self, family: Metric, alias: Alias) -> Metric:
        out = Metric(alias.vllm, f"{family.documentation} (vLLM's name for {alias.ours}.)",
                     family.type)
        for sample in family.samples:
            # gptq_x_total -> vllm:x_total, gptq_x_bucket -> vllm:x_bucket, ...
            suffix = sample.name[len(family.name):]
            labels = {alias.labels.get(k, k): v for k, v in sample.labels.items()}
            out.samples.append(sample._replace(name=alias.vllm + suffix,
                                               labels={**labels, **self.constant_labels}))
        return out

    def _cache_config_info(self, num_blocks: int) -> Metric:
        """vLLM's info gauge of its KV-cache configuration (value 1; the facts are labels)."""
        out = Metric("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                     "gauge")
        out.add_sample("vllm:cache_config_info", {
            "block_size": str(self.cache.block_size), "cache_dtype": self.cache.cache_dtype,
            "gpu_memory_utilization": str(self.cache.gpu_memory_utilization),
            "enable_prefix_caching": str(self.cache.enable_prefix_caching),
            "num_gpu_blocks": str(num_blocks), "engine": ENGINE_INDEX}, 1.0)
        return out
