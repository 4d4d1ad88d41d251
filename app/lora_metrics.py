"""LoRA metrics read at scrape time: one info sample per served adapter, and vLLM's
lora_requests_info (the adapters of the running and waiting requests; max_lora 0 and no
adapters when LoRA is off, so the family, and its vLLM alias, exist once an engine does)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from engine.lora.registry import LoraAdapterInfo


@dataclass(frozen=True)
class LoraView:
    """What the collector reads: the served adapters, those of the running and the waiting
    requests, and the device slot count (0: LoRA off)."""

    adapters: tuple[LoraAdapterInfo, ...]
    running: tuple[str, ...]
    waiting: tuple[str, ...]
    max_loras: int


class LoraCollector(Collector):
    def __init__(self, view: Callable[[], LoraView | None], parent: str) -> None:
        self._view = view
        self._parent = parent

    def collect(self) -> Iterator[GaugeMetricFamily]:
        view = self._view()
        if view is None:  # no engine yet (its gauges appear with it)
            return
        info = GaugeMetricFamily(
            "gptq_lora_adapter_info", "A served LoRA adapter (value 1), by name; parent is the "
            "base model it runs on.", labels=["name", "parent", "source", "revision", "rank",
                                              "target_modules"])
        for a in view.adapters:
            info.add_metric([a.name, self._parent, a.source, a.revision or "", str(a.rank),
                             ",".join(a.target_modules)], 1)
        yield info
        requests = GaugeMetricFamily(
            "gptq_lora_requests_info", "LoRA adapters of the running and the waiting requests "
            "(comma-separated) and the device slot count (vLLM's lora_requests_info).",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
        requests.add_metric([str(view.max_loras), ",".join(view.running),
                             ",".join(view.waiting)], 1)
        yield requests
