"""The LoRA adapters an engine serves: reading them, registering them with the runner's device
slots, and releasing them when their last request ends. Used by the engine core's loop only,
except ``read`` (any thread: it touches no engine state), which the loop runs on a worker
while it goes on stepping.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from engine.core.runner import ModelRunner
from engine.lora.peft import LoraAdapter
from engine.lora.registry import LoraAdapterInfo, LoraHandle, LoraRegistry
from engine.lora.spec import LoraError, LoraSpec
from engine.progress import timed_stage

log = logging.getLogger(__name__)

LoraReader = Callable[[LoraSpec], LoraAdapter]


class EngineAdapters:
    def __init__(self, runner: ModelRunner, reader: LoraReader | None,
                 max_lora_rank: int) -> None:
        """``reader`` reads and checks an adapter against the model (None: LoRA off)."""
        self.runner = runner
        self.registry = LoraRegistry()
        self._reader = reader
        self._max_lora_rank = max_lora_rank

    def read(self, spec: LoraSpec) -> LoraAdapter:
        if self._reader is None:
            raise LoraError("this server was started without LoRA support (give "
                            "--lora-modules or --allow-runtime-lora-updating)",
                            code="lora_disabled")
        return self._reader(spec)

    def load(self, adapter: LoraAdapter, replace: bool = False) -> LoraAdapterInfo:
        """Serve a read adapter under its name (``replace``: instead of the one loaded under
        it; requests already running keep the old weights to the end)."""
        spec = adapter.spec
        info = LoraAdapterInfo(name=spec.name, source=spec.source, revision=spec.revision,
                               rank=adapter.rank, target_modules=adapter.target_modules,
                               digest=adapter.digest)
        handle, dropped = self.registry.add(info, replace)
        self.runner.add_lora(handle.id, adapter)
        if dropped is not None:
            self.runner.drop_lora(dropped)
        log.info("LoRA adapter '%s' loaded from %s: rank %d on %s (%.1f MiB)", spec.name,
                 spec.describe(), adapter.rank, ", ".join(adapter.target_modules),
                 adapter.nbytes / 2**20)
        return info

    def unload(self, name: str) -> None:
        dropped = self.registry.remove(name)
        if dropped is not None:
            self.runner.drop_lora(dropped)
        log.info("LoRA adapter '%s' unloaded", name)

    def infos(self) -> tuple[LoraAdapterInfo, ...]:
        return self.registry.infos()

    def acquire(self, name: str) -> LoraHandle:
        """A new request's share of the adapter ``name`` (LoraError if it is not served)."""
        return self.registry.acquire(name)

    def release(self, handle: LoraHandle) -> None:
        """A request with ``handle`` ended; an adapter unloaded earlier goes with its last."""
        if self.registry.release(handle):
            self.runner.drop_lora(handle.id)

    def load_at_start(self, specs: tuple[LoraSpec, ...]) -> None:
        """The --lora-modules adapters; the first bad one raises LoraError (no server)."""
        start = time.monotonic()
        for spec in specs:
            self.load(self.read(spec))
        slots = self.runner.lora_slots
        assert slots is not None
        timed_stage(log, "lora", start, f"{len(specs)} adapters loaded; {slots.max_loras} "
                    f"device slots of rank {self._max_lora_rank} "
                    f"({slots.device_bytes / 2**30:.2f} GiB)")
