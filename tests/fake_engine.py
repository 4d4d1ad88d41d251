"""A real, in-process implementation of ``EngineClient`` without a model, and the tools to
serve it from a real server process.

The fake keeps the engine's observable contract: a bounded running batch (``max_num_seqs``)
fed from a FIFO waiting queue, KV blocks reserved at admission and freed on finish or abort,
one token per running request per step (``token_delay_s`` apart), stop strings found across
token boundaries (with the engine's own matcher), stop token ids, ``min_tokens``,
``ignore_eos``, ``logit_bias`` of +-100 (forced or banned tokens), logprobs and prompt logprobs,
seeded sampling and aborts. Tokens come from the real tokenizer of a checkpoint folder. It has
no LoRA adapters and no prefix cache: it reports no cached blocks, queries or hits, and 0
cached tokens.

"Generation" is deterministic: greedy picks a word token from a hash of the last three token
ids; sampling draws word tokens from ``random.Random(seed)``. A prompt whose text contains
``FAULT_MARKER`` ends with ``FinishReason.ERROR`` after its first token (to test errors that
arrive after a stream began).

Run a server over it: ``python -m tests.fake_engine --model CHECKPOINT_DIR --port P
[--token-delay S] [--load-delay S] [any gptq-serve serve flag]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from engine.checkpoint.marker import has_random_weights
from engine.lora.registry import LoraAdapterInfo
from engine.lora.spec import LoraError, LoraSpec
from engine.outputs import (
    EngineStats,
    FinishReason,
    GenerationDelta,
    ModelInfo,
    RequestTimings,
    TokenLogprob,
)
from engine.params import SamplingParams
from engine.tokenizer.stop import StopStringMatcher
from engine.tokenizer.tokenizer import Tokenizer

FAULT_MARKER = "FAULT"


@dataclass(frozen=True)
class FakeEngineOptions:
    max_model_len: int = 512
    max_num_seqs: int = 8
    num_kv_blocks: int = 1024
    block_size: int = 16
    # Seconds between engine steps (one token per running request per step).
    token_delay_s: float = 0.0
    # Seconds start() takes, standing in for loading a model.
    load_delay_s: float = 0.0


@dataclass
class _Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    rng: random.Random
    matcher: StopStringMatcher | None
    arrival: float
    queue: asyncio.Queue[GenerationDelta] = field(default_factory=asyncio.Queue)
    output: list[int] = field(default_factory=list)
    num_blocks: int = 0
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    faulty: bool = False


class FakeEngine:
    def __init__(self, tokenizer: Tokenizer, info: ModelInfo, options: FakeEngineOptions) -> None:
        self._tokenizer = tokenizer
        self._info = info
        self.options = options
        strings = tokenizer.token_strings(range(tokenizer.vocab_size))
        # Word pieces ("▁word"): their text is the same alone and in context, so the fake's
        # output text is simply the concatenation of its tokens' strings.
        self._words = [i for i, s in enumerate(strings)
                       if len(s) >= 3 and s[0] == " " and s[1:].isascii() and s[1:].isalpha()]
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._requests: dict[str, _Request] = {}
        self._free_blocks = options.num_kv_blocks
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._alive = False
        self._num_prompt_tokens = self._num_generation_tokens = self._num_steps = 0

    @classmethod
    def load(cls, folder: str, options: FakeEngineOptions) -> FakeEngine:
        tokenizer = Tokenizer.from_pretrained(folder)
        quant = json.loads((Path(folder) / "quantize_config.json").read_text())
        group = quant["group_size"]
        info = ModelInfo(model=folder, revision=None, bits=quant["bits"],
                         group_size=None if group == -1 else group,
                         act_order=quant["desc_act"], linear_backend="fake",
                         attention_backend="fake", max_model_len=options.max_model_len,
                         vocab_size=tokenizer.vocab_size, device="cpu",
                         random_weights=has_random_weights(Path(folder)))
        return cls(tokenizer, info, options)

    # ---- EngineClient ----------------------------------------------------------------------

    @property
    def model_info(self) -> ModelInfo:
        return self._info

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self._running), num_waiting=len(self._waiting),
            num_kv_blocks_total=self.options.num_kv_blocks,
            num_kv_blocks_free=self._free_blocks, num_kv_blocks_cached=0,
            num_preemptions_total=0, num_prompt_tokens_total=self._num_prompt_tokens,
            num_generation_tokens_total=self._num_generation_tokens,
            num_steps_total=self._num_steps, num_prefix_cache_queries_total=0,
            num_prefix_cache_hits_total=0, loop_alive=self._alive)

    async def start(self) -> None:
        await asyncio.sleep(self.options.load_delay_s)
        self._alive = True
        self._task = asyncio.create_task(self._loop())

    async def shutdown(self) -> None:
        self._alive = False
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for request_id in list(self._requests):
            self._finish(self._requests[request_id], FinishReason.ABORT,
                         error="the server is shutting down")

    def lora_adapters(self) -> tuple[LoraAdapterInfo, ...]:
        return ()

    async def load_lora(self, spec: LoraSpec, replace: bool = False) -> LoraAdapterInfo:
        raise LoraError("this engine serves no LoRA adapters", code="lora_disabled")

    async def unload_lora(self, name: str) -> None:
        raise LoraError(f"the LoRA adapter '{name}' cannot be found", code="lora_not_found")

    async def generate(self, prompt_token_ids: Sequence[int], params: SamplingParams,
                       request_id: str, lora: str | None = None
                       ) -> AsyncIterator[GenerationDelta]:
        if lora is not None:
            raise LoraError(f"the model '{lora}' does not exist", code="lora_not_found")
        prompt = list(prompt_token_ids)
        self._validate(prompt, params, request_id)
        req = _Request(request_id, prompt, params,
                       random.Random(params.seed) if params.seed is not None else random.Random(),
                       StopStringMatcher(params.stop) if params.stop else None,
                       time.monotonic(),
                       faulty=FAULT_MARKER in self._tokenizer.decode(prompt))
        self._requests[request_id] = req
        self._waiting.append(req)
        self._wake.set()
        finished = False
        try:
            while not finished:
                delta = await req.queue.get()
                finished = delta.finished
                yield delta
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        req = self._requests.get(request_id)
        if req is not None:
            self._finish(req, FinishReason.ABORT)

    # ---- the step loop ---------------------------------------------------------------------

    def _validate(self, prompt: list[int], params: SamplingParams, request_id: str) -> None:
        if not self._alive:
            raise RuntimeError("the engine is not running")
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt:
            raise ValueError("the prompt is empty")
        if any(not 0 <= t < self._tokenizer.vocab_size for t in prompt):
            raise ValueError("a prompt token id is outside the vocabulary")
        if params.constraint is not None:  # its words would not follow any grammar
            raise ValueError("the fake engine does not decode under a grammar")
        if len(prompt) >= self.options.max_model_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the model takes at most "
                             f"{self.options.max_model_len - 1}")

    async def _loop(self) -> None:
        while True:
            if not self._waiting and not self._running:
                self._wake.clear()
                await self._wake.wait()
            self._admit()
            for req in list(self._running):
                self._decode_one(req)
            self._num_steps += 1
            # Yield even with no delay, so clients and aborts get their turn between steps.
            await asyncio.sleep(self.options.token_delay_s)

    def _admit(self) -> None:
        """FIFO admission: a request enters the batch when a slot and the KV blocks for its
        whole length are free; a request that does not fit blocks those behind it."""
        while self._waiting and len(self._running) < self.options.max_num_seqs:
            req = self._waiting[0]
            need = math.ceil((len(req.prompt) + req.params.max_tokens) / self.options.block_size)
            if need > self._free_blocks:
                return
            self._waiting.popleft()
            self._free_blocks -= need
            req.num_blocks = need
            req.first_scheduled = time.monotonic()
            self._num_prompt_tokens += len(req.prompt)
            self._running.append(req)

    def _decode_one(self, req: _Request) -> None:
        params = req.params
        token = self._next_token(req)
        req.output.append(token)
        self._num_generation_tokens += 1
        req.first_token = req.first_token or time.monotonic()
        req.last_token = time.monotonic()
        eos = token == self._tokenizer.eos_token_id
        special = eos and params.skip_special_tokens
        text = "" if special else self._tokenizer.token_strings([token])[0]
        finish: FinishReason | None = None
        stop_reason: str | int | None = None
        may_stop = len(req.output) >= params.min_tokens
        if req.matcher is not None:
            matched = req.matcher.feed(text)
            text = matched.text
            if matched.stop is not None:
                finish, stop_reason = FinishReason.STOP, matched.stop
        if finish is None and may_stop and eos and not params.ignore_eos:
            finish, stop_reason = FinishReason.STOP, token
        if finish is None and may_stop and token in params.stop_token_ids:
            finish, stop_reason = FinishReason.STOP, token
        if finish is None and len(req.output) >= params.max_tokens:
            finish = FinishReason.LENGTH
            text += req.matcher.flush() if req.matcher is not None else ""
        if finish is None and req.faulty:
            finish = FinishReason.ERROR
        prompt_logprobs = None
        if len(req.output) == 1 and params.prompt_logprobs is not None:
            prompt_logprobs = (None, *(self._logprob(req.prompt[:i], t, params.prompt_logprobs)
                                       for i, t in enumerate(req.prompt) if i > 0))
        logprobs = None if params.logprobs is None else (
            self._logprob(req.prompt + req.output[:-1], token, params.logprobs),)
        self._send(req, GenerationDelta(
            request_id=req.request_id, token_ids=(token,), text=text, logprobs=logprobs,
            num_prompt_tokens=len(req.prompt), num_output_tokens=len(req.output),
            prompt_logprobs=prompt_logprobs))
        if finish is not None:
            self._finish(req, finish, stop_reason,
                         "injected fault" if finish == FinishReason.ERROR else None)

    def _next_token(self, req: _Request) -> int:
        bias = req.params.logit_bias
        forced = sorted(t for t, b in bias.items() if b >= 100)
        if forced:
            return forced[0]
        candidates = [t for t in self._words if bias.get(t, 0.0) > -100]
        if req.params.greedy:
            context = req.prompt + req.output
            key = zlib.crc32(json.dumps(context[-3:]).encode())
            return candidates[key % len(candidates)]
        return req.rng.choice(candidates)

    def _logprob(self, context: list[int], token: int, k: int) -> TokenLogprob:
        """Made-up but consistent logprobs: the chosen token is the most likely."""
        lp = -0.5 - (zlib.crc32(json.dumps([*context[-3:], token]).encode()) % 100) / 50
        others = [t for t in self._words if t != token][:max(k - 1, 0)]
        top = ((token, lp), *((t, lp - 1.0 - i) for i, t in enumerate(others)))[:k]
        return TokenLogprob(token_id=token, logprob=lp, top=top)

    def _send(self, req: _Request, delta: GenerationDelta) -> None:
        req.queue.put_nowait(delta)

    def _finish(self, req: _Request, reason: FinishReason, stop_reason: str | int | None = None,
                error: str | None = None) -> None:
        """End a request: free its blocks and, unless its last delta already carried the
        ending, send one final (empty) delta with the finish reason."""
        self._requests.pop(req.request_id, None)
        if req in self._running:
            self._running.remove(req)
        if req in self._waiting:
            self._waiting.remove(req)
        self._free_blocks += req.num_blocks
        req.num_blocks = 0
        now = time.monotonic()
        self._send(req, GenerationDelta(
            request_id=req.request_id, token_ids=(), text="",
            logprobs=() if req.params.logprobs is not None else None,
            num_prompt_tokens=len(req.prompt), num_output_tokens=len(req.output),
            finish_reason=reason, stop_reason=stop_reason, error=error,
            timings=RequestTimings(req.arrival, req.first_scheduled, req.first_token, now,
                                   req.last_token)))


# ---- serving it from a real process ---------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A server in a child process on a free localhost port; its output goes to ``log_path``
    (printed when a start fails, so a broken server explains itself)."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.argv = [*argv, "--host", "127.0.0.1", "--port", str(self.port)]
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def fake(cls, model: Path, log_path: Path, *flags: str, token_delay: float = 0.0,
             load_delay: float = 0.0, env: dict[str, str] | None = None) -> ServerProcess:
        return cls([sys.executable, "-m", "tests.fake_engine", "--model", str(model),
                    "--token-delay", str(token_delay), "--load-delay", str(load_delay),
                    *flags], log_path, env)

    @classmethod
    def real(cls, model: Path, log_path: Path, *flags: str) -> ServerProcess:
        """The real ``gptq-serve serve`` command (the console script beside this Python)."""
        command = str(Path(sys.executable).with_name("gptq-serve"))
        return cls([command, "serve", "--model", str(model), *flags], log_path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: str | None = "/ready", timeout: float = 60.0) -> ServerProcess:
        root = Path(__file__).resolve().parents[1]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, cwd=root)
        if wait is not None:
            self.wait_for(wait, timeout)
        return self

    def wait_for(self, path: str, timeout: float) -> None:
        """Until GET ``path`` answers 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited ({self.proc.returncode}):\n{self.log()}")
            try:
                if httpx.get(self.url + path, timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{path} not 200 within {timeout} s:\n{self.log()}")

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def scrape(url: str, headers: dict[str, str] | None = None) -> dict[str, float]:
    """Every sample of ``url``/metrics by name and labels, as
    'gptq_request_success_total{finish_reason="abort"}' (labels sorted)."""
    out = {}
    text = httpx.get(url + "/metrics", headers=headers).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def scrape_when_idle(url: str, timeout: float = 5.0) -> dict[str, float]:
    """/metrics once no request runs or waits and no request holds a KV block (every block
    free or cached for reuse), or the timeout passed: the caller's assertions then say what is
    still held."""
    deadline = time.monotonic() + timeout
    while True:
        m = scrape(url)
        available = m["gptq_kv_cache_blocks_free"] + m["gptq_kv_cache_blocks_cached"]
        idle = (m["gptq_num_requests_running"] == 0 and m["gptq_num_requests_waiting"] == 0
                and available == m["gptq_kv_cache_blocks_total"])
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def sse_frames(body: str) -> list[str]:
    """The frames of an SSE body, each checked to be one `data: ...` or `: comment` line
    followed by a blank line."""
    assert body.endswith("\n\n"), f"an SSE body must end with a blank line: {body[-80:]!r}"
    frames = body[:-2].split("\n\n")
    for frame in frames:
        assert "\n" not in frame and frame.startswith(("data: ", ": ")), frame
    return frames


def sse_data(body: str) -> list[str]:
    """The data payloads of an SSE body (comments dropped), `[DONE]` included."""
    return [f[len("data: "):] for f in sse_frames(body) if f.startswith("data: ")]


def main(argv: Sequence[str] | None = None) -> int:
    """Serve a FakeEngine over the checkpoint folder given as --model, with every
    ``gptq-serve serve`` setting (max_num_seqs, num_kv_blocks, ... shape the fake too)."""
    from app.server import serve
    from app.settings import add_arguments, settings_from_args

    parser = argparse.ArgumentParser(prog="fake-engine-server",
                                     argument_default=argparse.SUPPRESS)
    parser.add_argument("--token-delay", type=float, default=0.0, dest="token_delay")
    parser.add_argument("--load-delay", type=float, default=0.0, dest="load_delay")
    add_arguments(parser)
    args = parser.parse_args(argv)
    settings = settings_from_args(args)
    options = FakeEngineOptions(
        max_model_len=settings.max_model_len or 512, max_num_seqs=settings.max_num_seqs,
        num_kv_blocks=settings.num_kv_blocks or 1024, block_size=settings.block_size,
        token_delay_s=args.token_delay, load_delay_s=args.load_delay)
    return serve(settings, FakeEngine.load(settings.model, options))


if __name__ == "__main__":
    sys.exit(main())
