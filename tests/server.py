"""Helpers for end-to-end tests against real server processes (see ``ServerProcess`` in
tests/fake_engine.py): starting several servers at once, reading what a stretch of traffic
changed in /metrics, and the transformers answer a served checkpoint must give."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import torch

from engine.checkpoint.loader import load_checkpoint
from tests.fake_engine import ServerProcess, scrape
from tests.reference import reference_model
from tests.schemas.validate import validate


def real_server(checkpoint: Path, log_path: Path, *flags: str,
                env: dict[str, str] | None = None) -> ServerProcess:
    """``gptq-serve serve`` on the CPU over ``checkpoint`` (not started yet).

    One intra-op thread: with torch's default pool (one thread per core) a tiny model's step
    is dominated by OpenMP hand-offs, and when the cores are shared (the event loop, the test
    client, other servers) each hand-off waits for a descheduled thread: measured on two busy
    cores, 4 ms a token with one thread against 60-80 ms with two.
    """
    command = str(Path(sys.executable).with_name("gptq-serve"))
    return ServerProcess([command, "serve", "--model", str(checkpoint), "--device", "cpu",
                          "--dtype", "float32", *flags], log_path,
                         env={"OMP_NUM_THREADS": "1", **(env or {})})


def strict_client(server: ServerProcess, key: str) -> openai.OpenAI:
    """The official SDK against ``server``, validating every response strictly, no retries."""
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0,
                         _strict_response_validation=True)


@contextmanager
def serving(*servers: ServerProcess, timeout: float = 120.0) -> Iterator[None]:
    """Start every server, then wait for each one's /ready: the processes load in parallel.
    On exit every server is sent SIGTERM at once and then waited for (each drains for a
    moment), even when one failed to start."""
    try:
        for srv in servers:
            srv.start(wait=None)
        for srv in servers:
            srv.wait_for("/ready", timeout)
        yield
    finally:
        stop_all(servers)


def stop_all(servers: Sequence[ServerProcess], timeout: float = 15.0) -> None:
    """SIGTERM to every running server, then wait for each; one that outlives ``timeout`` is
    stopped the hard way (``ServerProcess.stop``)."""
    running = [s for s in servers if s.proc is not None and s.proc.poll() is None]
    for srv in running:
        srv.send_signal(signal.SIGTERM)
    for srv in running:
        try:
            srv.wait(timeout)
        except subprocess.TimeoutExpired:
            srv.stop()


def post_ok(server: ServerProcess, path: str, body: dict[str, Any],
            headers: dict[str, str] | None = None) -> dict[str, Any]:
    """POST ``body``; the response must be 200 and, for the two generation routes, valid
    against the official schema."""
    r = httpx.post(server.url + path, json=body, headers=headers, timeout=120)
    assert r.status_code == 200, f"{path} {body} -> {r.status_code} {r.text}"
    out = r.json()
    schema = {"/v1/completions": "CreateCompletionResponse",
              "/v1/chat/completions": "CreateChatCompletionResponse"}.get(path)
    if schema is not None:
        validate(schema, out)
    return out


@dataclass(frozen=True)
class MetricsDelta:
    """Two /metrics scrapes; ``[name]`` is how much a sample grew between them (0 for a sample
    absent from both, so a labelled counter that was never touched reads 0)."""

    before: dict[str, float]
    after: dict[str, float]

    def __getitem__(self, sample: str) -> float:
        return self.after.get(sample, 0.0) - self.before.get(sample, 0.0)


class MetricsWatch:
    """``with MetricsWatch(url) as watch: ...`` then ``watch.delta[...]``."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.url = url
        self.headers = headers
        self._before: dict[str, float] = {}
        self._delta: MetricsDelta | None = None

    def __enter__(self) -> MetricsWatch:
        self._before = scrape(self.url, self.headers)
        return self

    def __exit__(self, *exc: object) -> None:
        self._delta = MetricsDelta(self._before, scrape(self.url, self.headers))

    @property
    def delta(self) -> MetricsDelta:
        assert self._delta is not None, "read the delta after the with block"
        return self._delta


@dataclass(frozen=True)
class TopLogprobs:
    """One position of the reference: the log-probability of the token that followed, and the
    k most likely tokens there with theirs, best first."""

    logprob: float
    top: tuple[tuple[int, float], ...]


@contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """Run torch on one intra-op thread for a while (see real_server: on shared cores the
    tiny reference model runs about six times faster so)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class GreedyReference:
    """transformers' LlamaForCausalLM on a checkpoint's dequantised weights (tests/reference.py),
    loaded once: the greedy continuation and the log-probabilities a served model must give."""

    def __init__(self, checkpoint: Path) -> None:
        self.model = reference_model(load_checkpoint(str(checkpoint), None, offline=True))

    @torch.no_grad()
    @one_intra_op_thread()
    def greedy(self, prompt: Sequence[int], num_tokens: int) -> list[int]:
        ids = torch.tensor([list(prompt)])  # ids: [1, T]
        out: list[int] = []
        for _ in range(num_tokens):
            token = int(self.model(ids).logits[0, -1].argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        return out

    @torch.no_grad()
    @one_intra_op_thread()
    def logprobs(self, token_ids: Sequence[int], k: int) -> list[TopLogprobs]:
        """Position i (i >= 1) of ``token_ids`` as predicted from tokens [0, i): one entry per
        token after the first."""
        ids = torch.tensor([list(token_ids)])  # ids: [1, T]
        logp = torch.log_softmax(self.model(ids).logits[0].float(), dim=-1)  # logp: [T, V]
        values, indices = logp.topk(k, dim=-1)  # values, indices: [T, k]
        return [TopLogprobs(float(logp[i - 1, token_ids[i]]),
                            tuple(zip(indices[i - 1].tolist(), values[i - 1].tolist(),
                                      strict=True)))
                for i in range(1, len(token_ids))]
