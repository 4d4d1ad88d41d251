"""The sockets between the front and the engine core: two ZeroMQ PUSH/PULL pipes over IPC.

Each pipe's writer connects and its reader binds: a connecting PUSH socket queues what it is
given from the start, even before its peer exists or while the peer is busy, so neither side
ever waits for the other to be up (the front's first commands, the core's first outputs).
PUSH/PULL keeps messages in order and whole (no framing of our own), and sends return at once:
ZeroMQ's I/O thread writes them out, so a slow front never blocks an engine step. No high-water mark: a burst is never dropped or blocked; a peer that stops
reading for good is the watchdog's business (engine/frontend/client.py).

On Linux the sockets live in the abstract namespace (``ipc://@name``): no file to clean up when
a process is killed. Elsewhere they are files in a private temporary folder.

Why ZeroMQ + msgspec: docs/architecture.md ("The engine process") gives the measurements.
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from dataclasses import dataclass

import zmq


@dataclass(frozen=True)
class Addresses:
    commands: str  # front -> core
    outputs: str  # core -> front

    @classmethod
    def new(cls) -> Addresses:
        name = f"gptq-serve-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        if sys.platform.startswith("linux"):
            base = f"ipc://@{name}"
        else:
            base = "ipc://" + os.path.join(tempfile.mkdtemp(prefix="gptq-serve-"), "core")
        return cls(commands=f"{base}-commands", outputs=f"{base}-outputs")


def configure(socket: zmq.Socket, linger_ms: int) -> None:
    socket.setsockopt(zmq.SNDHWM, 0)
    socket.setsockopt(zmq.RCVHWM, 0)
    socket.setsockopt(zmq.LINGER, linger_ms)


def _socket(context: zmq.Context, kind: int, address: str, linger_ms: int = 0) -> zmq.Socket:
    """A pipe end: the writer (PUSH) connects, the reader (PULL) binds."""
    socket = context.socket(kind)
    configure(socket, linger_ms)
    if kind == zmq.PUSH:
        socket.connect(address)
    else:
        socket.bind(address)
    return socket


def core_sockets(context: zmq.Context, addresses: Addresses) -> tuple[zmq.Socket, zmq.Socket]:
    """(commands PULL, outputs PUSH) of the core. The outputs socket lingers on close so the
    last message (CoreStopped) reaches the front before the process exits."""
    return (_socket(context, zmq.PULL, addresses.commands),
            _socket(context, zmq.PUSH, addresses.outputs, linger_ms=5000))


def front_sockets(context: zmq.Context, addresses: Addresses) -> tuple[zmq.Socket, zmq.Socket]:
    """(commands PUSH, outputs PULL) of the front, made before the core starts."""
    return (_socket(context, zmq.PUSH, addresses.commands),
            _socket(context, zmq.PULL, addresses.outputs))
