"""Which adapters sit in the model's fixed device slots: least recently used out first.

Every loaded adapter keeps a host copy (in the model dtype; pinned on CUDA so a swap is one
asynchronous copy per layer). ``prepare`` makes a step's adapters resident before its batch is
built; the scheduler guarantees a step never needs more than ``max_loras`` distinct adapters,
so the adapters evicted are never ones the step uses. Engine thread only.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable

import torch

from engine.lora.peft import LoraAdapter
from engine.model.lora.base import LoraSite

log = logging.getLogger(__name__)

HostWeights = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, module) -> a, b


class LoraSlots:
    def __init__(self, sites: list[LoraSite], max_loras: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.sites = sites
        self.max_loras = max_loras
        self.dtype = dtype
        self.device = device
        self._host: dict[int, HostWeights] = {}  # adapter id -> its weights on the host
        self._resident: OrderedDict[int, int] = OrderedDict()  # adapter id -> slot, LRU first
        self._free = list(range(max_loras))
        self.num_swaps = 0  # adapters copied into a slot since start

    @property
    def device_bytes(self) -> int:
        return sum(site.nbytes for site in self.sites)

    @property
    def resident(self) -> dict[int, int]:
        return dict(self._resident)

    def add(self, adapter_id: int, adapter: LoraAdapter) -> None:
        pin = self.device.type == "cuda"

        def stage(t: torch.Tensor) -> torch.Tensor:
            t = t.to(self.dtype).contiguous()
            return t.pin_memory() if pin else t

        self._host[adapter_id] = {key: (stage(w.a), stage(w.b))
                                  for key, w in adapter.modules.items()}

    def remove(self, adapter_id: int) -> None:
        """Forget an adapter no sequence uses any more; its slot becomes free."""
        self._host.pop(adapter_id, None)
        slot = self._resident.pop(adapter_id, None)
        if slot is not None:
            self._free.append(slot)

    def prepare(self, adapter_ids: Iterable[int]) -> dict[int, int]:
        """Make every adapter of a step resident; returns adapter id -> slot."""
        wanted = list(dict.fromkeys(adapter_ids))
        if len(wanted) > self.max_loras:
            raise RuntimeError(f"a step needs {len(wanted)} adapters, more than max_loras "
                               f"{self.max_loras} (the scheduler must prevent this)")
        for adapter_id in wanted:
            if adapter_id in self._resident:
                self._resident.move_to_end(adapter_id)
        for adapter_id in wanted:
            if adapter_id not in self._resident:
                self._load(adapter_id, set(wanted))
        return {adapter_id: self._resident[adapter_id] for adapter_id in wanted}

    def _load(self, adapter_id: int, keep: set[int]) -> None:
        if not self._free:
            victim = next(a for a in self._resident if a not in keep)  # least recently used
            self._free.append(self._resident.pop(victim))
        slot = self._free.pop()
        host = self._host[adapter_id]
        for site in self.sites:
            site.write(slot, [host.get((site.layer, m)) for m in site.modules])
        self._resident[adapter_id] = slot
        self.num_swaps += 1
        log.debug("LoRA adapter %d -> slot %d", adapter_id, slot)
