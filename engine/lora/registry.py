"""The adapters an engine serves, by name. Torch-free; engine thread only.

Each load gets a fresh id, so a name reloaded with other weights is another adapter to the rest
of the engine (its own device slot contents, its own prefix-cache key). An adapter unloaded
while requests still run with it stays until the last of them ends: ``release`` then says it
can be dropped.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from engine.lora.spec import LoraError


@dataclass(frozen=True)
class LoraHandle:
    """What a sequence carries: which loaded adapter it runs with."""

    id: int
    name: str
    # Part of every KV block hash of the sequence: the name and a digest of the weights, so
    # neither another adapter nor a reload of this name with other weights shares its blocks.
    hash_key: str


@dataclass(frozen=True)
class LoraAdapterInfo:
    """A served adapter as the HTTP layer and the metrics see it."""

    name: str
    source: str
    revision: str | None
    rank: int
    target_modules: tuple[str, ...]
    digest: str


class LoraRegistry:
    def __init__(self) -> None:
        self._by_name: dict[str, tuple[LoraHandle, LoraAdapterInfo]] = {}
        self._users: dict[int, int] = {}  # adapter id -> live sequences running with it
        self._unloaded: set[int] = set()  # ids no longer served but still in use
        self._ids = itertools.count(1)

    def infos(self) -> tuple[LoraAdapterInfo, ...]:
        return tuple(info for _, info in self._by_name.values())

    def add(self, info: LoraAdapterInfo, replace: bool = False
            ) -> tuple[LoraHandle, int | None]:
        """Serve ``info`` under its name. Returns its handle and, when it replaced an adapter
        of the same name that no sequence uses, that adapter's id (to drop its weights)."""
        old = self._by_name.get(info.name)
        if old is not None and not replace:
            raise LoraError(f"the LoRA adapter '{info.name}' has already been loaded",
                            code="lora_exists")
        handle = LoraHandle(next(self._ids), info.name, f"lora:{info.name}:{info.digest}")
        self._by_name[info.name] = (handle, info)
        self._users[handle.id] = 0
        return handle, None if old is None else self._retire(old[0].id)

    def remove(self, name: str) -> int | None:
        """Stop serving ``name``; returns its id if no sequence uses it (drop it now)."""
        entry = self._by_name.pop(name, None)
        if entry is None:
            raise LoraError(f"the LoRA adapter '{name}' cannot be found", code="lora_not_found")
        return self._retire(entry[0].id)

    def acquire(self, name: str) -> LoraHandle:
        """The handle a new sequence runs with (one more user)."""
        entry = self._by_name.get(name)
        if entry is None:
            raise LoraError(f"the model '{name}' does not exist", code="lora_not_found")
        self._users[entry[0].id] += 1
        return entry[0]

    def release(self, handle: LoraHandle) -> bool:
        """A sequence ended; True when its adapter was unloaded and this was its last user."""
        self._users[handle.id] -= 1
        if self._users[handle.id] == 0 and handle.id in self._unloaded:
            self._unloaded.discard(handle.id)
            del self._users[handle.id]
            return True
        return False

    def _retire(self, adapter_id: int) -> int | None:
        if self._users[adapter_id] == 0:
            del self._users[adapter_id]
            return adapter_id
        self._unloaded.add(adapter_id)
        return None
