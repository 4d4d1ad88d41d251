"""``gptq-serve bench transport``: what carrying one engine step's outputs from the core process
to the front costs, for the transports one could build the process boundary on.

A child process (the core's stand-in) sends ``--messages`` step messages, one every
``--interval-ms`` (a decode step's pace), each with ``--streams`` requests' new token (and,
with ``--logprobs``, 5 alternatives each) plus the engine stats: the ``StepOutputs`` the core
sends. The parent (the front's stand-in) receives and decodes them. Per transport:

- encode, send: the sender's time to encode one message and to hand it to the transport:
  what an engine step waits for;
- decode: the receiver's time to decode one (the front pays it);
- latency: send start to decoded on the other side (one machine-wide monotonic clock);
- bytes: one message on the wire.

Transports: ZeroMQ PUSH/PULL over IPC with msgspec MessagePack (what the server uses), ZeroMQ
with pickle, multiprocessing.Pipe (pickle) and multiprocessing.Queue (pickle, a feeder
thread). Medians and p99 over the messages; runs on any machine (no GPU).
"""

from __future__ import annotations

import argparse
import multiprocessing
import pickle
import statistics
import struct
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

import zmq

from engine.bench.server_bench import percentile
from engine.bench.table import Row
from engine.ipc.messages import Codec, RequestOutput, StepOutputs
from engine.outputs import EngineStats, TokenLogprob

TRANSPORTS = ("zmq+msgspec", "zmq+pickle", "pipe+pickle", "queue+pickle")
_STAMP = struct.Struct("<d")


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--messages", type=int, default=2000, help="transport mode: messages sent")
    p.add_argument("--interval-ms", type=float, default=2.0,
                   help="transport mode: one message every this many milliseconds")
    p.add_argument("--logprobs", action="store_true",
                   help="transport mode: each token with its logprob and 5 alternatives")


def step_message(streams: int, logprobs: bool) -> StepOutputs:
    """Distinct values everywhere (pickle would store repeated objects once)."""
    outputs = [RequestOutput(
        f"{i:032x}-0", [1000 + i],
        [TokenLogprob(1000 + i, -0.25 - i / 1e3, tuple((i + j, -0.5 - i / 1e3 - j)
                                                       for j in range(5)))]
        if logprobs else None, num_cached_tokens=16 * i, first_scheduled=1234.5 + i)
        for i in range(streams)]
    return StepOutputs(outputs, EngineStats(streams, 0, 10000, 9000, 100, 0, 10**6, 10**6,
                                            10**5, 10**6, 10**5, True))


def _encoders(kind: str) -> tuple[Callable[[float, StepOutputs], bytes],
                                  Callable[[bytes], tuple[float, StepOutputs]]]:
    if kind.endswith("msgspec"):
        codec = Codec()

        def encode(t: float, m: StepOutputs) -> bytes:
            return _STAMP.pack(t) + codec.encode(m)

        def decode(b: bytes) -> tuple[float, StepOutputs]:
            decoded = codec.decode_core(memoryview(b)[_STAMP.size:])
            assert isinstance(decoded, StepOutputs)
            return _STAMP.unpack_from(b)[0], decoded

        return encode, decode
    return (lambda t, m: pickle.dumps((t, m), protocol=pickle.HIGHEST_PROTOCOL)), pickle.loads


def _sender(kind: str, endpoint: object, args: tuple[int, float, int, bool],
            report: Connection) -> None:
    n, interval_ms, streams, logprobs = args
    message = step_message(streams, logprobs)
    encode, _ = _encoders(kind)
    context = zmq.Context()
    if kind.startswith("zmq"):
        socket = context.socket(zmq.PUSH)
        socket.setsockopt(zmq.SNDHWM, 0)
        socket.connect(str(endpoint))

        def send(b: bytes) -> None:
            socket.send(b, copy=False)
    elif kind.startswith("pipe"):
        send = endpoint.send_bytes  # type: ignore[attr-defined]
    else:
        send = endpoint.put  # type: ignore[attr-defined]
    encodes, sends = [], []
    next_at = time.monotonic()
    for _ in range(n):
        wait = next_at - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        next_at += interval_ms / 1e3
        t0 = time.monotonic()
        data = encode(t0, message)
        t1 = time.monotonic()
        send(data)
        encodes.append(t1 - t0)
        sends.append(time.monotonic() - t1)
    report.send((encodes, sends))
    time.sleep(0.5)  # let the queue's feeder thread and ZeroMQ flush before exiting
    context.destroy(linger=1000)


def measure(kind: str, n: int, interval_ms: float, streams: int, logprobs: bool
            ) -> list[Row]:
    """Every transport carries bytes (a Queue pickles them once more: its own cost)."""
    spawn = multiprocessing.get_context("spawn")
    _, decode = _encoders(kind)
    report_r, report_w = spawn.Pipe(duplex=False)
    context = zmq.Context()
    receive: Callable[[], bytes]
    if kind.startswith("zmq"):
        socket = context.socket(zmq.PULL)
        socket.setsockopt(zmq.RCVHWM, 0)
        endpoint: object = f"ipc://@gptq-bench-transport-{time.monotonic_ns()}"
        socket.bind(str(endpoint))

        def receive() -> bytes:
            return socket.recv(copy=False).bytes
    elif kind.startswith("pipe"):
        reader, endpoint = spawn.Pipe(duplex=False)
        receive = reader.recv_bytes
    else:
        queue = spawn.Queue()
        endpoint = queue
        receive = queue.get
    sender = spawn.Process(target=_sender, args=(
        kind, endpoint, (n, interval_ms, streams, logprobs), report_w))
    sender.start()
    costs, latencies = [], []
    size = 0
    for _ in range(n):
        raw = receive()
        t0 = time.monotonic()
        sent, message = decode(raw)
        done = time.monotonic()
        costs.append(done - t0)
        latencies.append(done - sent)
        size = len(raw)
        assert len(message.outputs) == streams
    encodes, sends = report_r.recv()
    sender.join(10)
    context.destroy(linger=0)
    us = 1e6
    return [Row(f"{kind}: encode, median", statistics.median(encodes) * us, "us"),
            Row(f"{kind}: send, median", statistics.median(sends) * us, "us"),
            Row(f"{kind}: encode + send, p99",
                percentile([a + b for a, b in zip(encodes, sends, strict=True)], 99) * us,
                "us"),
            Row(f"{kind}: decode, median", statistics.median(costs) * us, "us"),
            Row(f"{kind}: latency (send to decoded), median",
                statistics.median(latencies) * us, "us"),
            Row(f"{kind}: latency, p99", percentile(latencies, 99) * us, "us"),
            Row(f"{kind}: message size", size, "bytes")]


def run(args: argparse.Namespace) -> list[Row]:
    rows = [Row(f"{args.messages} step messages of {args.streams} requests"
                f"{' with 5 logprobs each' if args.logprobs else ''}, one every "
                f"{args.interval_ms} ms", 0, "")]
    for kind in TRANSPORTS:
        rows += measure(kind, args.messages, args.interval_ms, args.streams, args.logprobs)
    return rows

