"""The front's side of loading and unloading LoRA adapters in the engine core. Torch-free.

A load or unload is a command to the core, answered by a LoraResult some messages later (a
load reads the adapter's files first). Each call waits on a future kept here until its answer
comes, so that a core that dies or stops first fails it (EngineDeadError) instead of leaving
its caller waiting. Every answer carries the adapters served after it: the snapshot
``lora_adapters()`` returns.
"""

from __future__ import annotations

import asyncio
import itertools

from engine.client import EngineDeadError
from engine.ipc.messages import LoraResult
from engine.lora.registry import LoraAdapterInfo
from engine.lora.spec import LoraError


class LoraCalls:
    def __init__(self, adapters: tuple[LoraAdapterInfo, ...]) -> None:
        self.adapters = adapters
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[LoraAdapterInfo | None]] = {}

    def new(self) -> tuple[int, asyncio.Future[LoraAdapterInfo | None]]:
        """A call id and the future its answer settles (on the running loop)."""
        call_id = next(self._ids)
        future: asyncio.Future[LoraAdapterInfo | None] = \
            asyncio.get_running_loop().create_future()
        self._waiting[call_id] = future
        future.add_done_callback(lambda _: self._waiting.pop(call_id, None))
        return call_id, future

    def answer(self, result: LoraResult) -> None:
        self.adapters = tuple(result.adapters)
        future = self._waiting.pop(result.call_id, None)
        if future is None or future.done():  # the caller was cancelled meanwhile
            return
        if result.error is not None:
            future.set_exception(LoraError(result.error, result.code or "invalid_lora"))
        else:
            future.set_result(result.info)

    def fail_all(self, reason: str) -> None:
        for future in list(self._waiting.values()):
            if not future.done():
                future.set_exception(EngineDeadError(reason))
        self._waiting.clear()
