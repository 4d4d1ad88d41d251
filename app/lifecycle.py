"""Start-up (load, warm up, become ready) and graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
from starlette.types import ASGIApp

from app.logs import configure_logging
from app.settings import Settings
from app.state import ServerState
from app.templates import load_template
from engine.client import EngineClient

log = logging.getLogger(__name__)

T = TypeVar("T")


def build_engine(settings: Settings) -> EngineClient:
    """Start the engine core process and wait until its model is loaded and warmed up
    (blocking: run it in a thread). Imported here so that importing the app loads no
    tokenizer (nor, through transformers, torch). The core process logs its own loading
    stages, through the same log configuration as this one."""
    start = time.monotonic()
    from engine.frontend.client import EngineProcessClient
    from engine.frontend.spawn import CoreProcessOptions
    from engine.progress import timed_stage

    timed_stage(log, "engine", start, "engine client imported; starting the engine core "
                "process")
    return EngineProcessClient.launch(settings.engine_config(), CoreProcessOptions(
        hang_timeout_s=settings.engine_hang_timeout, warmup=settings.warmup,
        configure_logging=functools.partial(configure_logging, settings.log_level,
                                            settings.log_format)))


async def start(state: ServerState, engine: EngineClient | None, app: ASGIApp) -> None:
    """Load the model (unless given), start the loop, warm up through ``app``, then report
    ready."""
    settings = state.settings
    try:
        t0 = time.monotonic()
        if engine is None:
            engine = await in_daemon_thread(build_engine, settings)
        # The template first: a bad --chat-template fails start-up before the loop runs.
        state.template = load_template(settings.chat_template, engine.tokenizer.chat_template)
        await engine.start()
        state.engine = engine  # from here on, shut down with the app
        state.metrics.set_model_info(engine.model_info)
        state.serving = True
        if settings.warmup:
            t_warm = time.monotonic()
            sent = await warm_up(app, settings, engine)
            log.info("warm-up: %d requests through the app in %.2f s", sent,
                     time.monotonic() - t_warm,
                     extra={"stage": "warm-up", "seconds": round(time.monotonic() - t_warm, 3)})
        state.ready = True
        announce(settings, engine, time.monotonic() - t0)
    except Exception as exc:
        # Only the exception's type: /ready shows it to anyone, and the message may name
        # files; the log below has it all.
        state.load_error = type(exc).__name__
        log.exception("start-up failed")
        raise


async def in_daemon_thread(fn: Callable[..., T], *args: object) -> T:
    """Run a blocking call in a daemon thread. Unlike asyncio.to_thread (whose executor the
    event loop joins on exit), a SIGTERM during a minutes-long download or load then ends the
    process at once instead of waiting for the load to finish."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():  # the waiter was cancelled meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting coroutine
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=target, name="model-load", daemon=True).start()
    return await future


def announce(settings: Settings, engine: EngineClient, seconds: float) -> None:
    """The one line that says what is served where, once ready; and, for a checkpoint of
    random weights (the demo's), that its text is gibberish."""
    info = engine.model_info
    kv_tokens = engine.stats().num_kv_blocks_total * settings.block_size
    url = f"http://{display_host(settings.host)}:{settings.port}/v1"
    branch = f"branch {info.revision}" if info.revision else "a local folder"
    group = f"group {info.group_size}" if info.group_size is not None else "no grouping"
    log.info("serving %s at %s: %s (%s), %d-bit, %s, act-order %s; kernels: linear %s, "
             "attention %s on %s; KV cache %d tokens, context %d tokens; ready in %.1f s",
             ", ".join(settings.model_names), url, info.model, branch, info.bits, group,
             "on" if info.act_order else "off", info.linear_backend, info.attention_backend,
             info.device, kv_tokens, info.max_model_len, seconds,
             extra={"stage": "ready", "url": url, "kv_cache_tokens": kv_tokens,
                    "seconds": round(seconds, 3)})
    if info.random_weights:
        log.warning("%s has random weights (written by `gptq-serve synth`): every endpoint "
                    "works, but the text it generates is gibberish. Serve a trained "
                    "checkpoint with --model (e.g. `make run`) for real answers.", info.model)


def display_host(host: str) -> str:
    """How to write ``host`` in a URL one can open: a wildcard address as localhost, an IPv6
    address in brackets."""
    if host in ("0.0.0.0", "::", ""):
        return "localhost"
    return f"[{host}]" if ":" in host else host


# Requests the warm-up sends through the app: both generation routes, streamed and not, with
# the features whose code runs per token (logprobs, echo, stop strings, usage chunks).
_WARMUP_REQUESTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("/v1/completions", {"prompt": "Hello world.", "max_tokens": 4, "temperature": 0,
                         "ignore_eos": True, "logprobs": 2, "echo": True, "stop": ["\x00"],
                         "stream": True, "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}],
                              "max_tokens": 4, "temperature": 0, "ignore_eos": True,
                              "logprobs": True, "top_logprobs": 2}),
)


async def warm_up(app: ASGIApp, settings: Settings, engine: EngineClient) -> int:
    """Requests through the app itself, in-process, before the first user arrives: routing,
    validation, templates, the engine client and its messages, detokenising, stop strings,
    logprob formatting, SSE and JSON encoding all run once; with LoRA adapters loaded, the
    first request once more with one of them. (The engine core has already run every step
    shape and sampler path before it reported loaded, engine/core/warmup.py.) The warm-up
    requests count in the metrics like any others. Returns how many were sent."""
    headers = {"Authorization": f"Bearer {settings.api_keys[0]}"} if settings.api_keys else {}
    adapters = engine.lora_adapters()
    runs = [(path, {"model": settings.model_names[0], **body})
            for path, body in _WARMUP_REQUESTS]
    if adapters:
        path, body = _WARMUP_REQUESTS[0]
        runs.append((path, {"model": adapters[0].name, **body}))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://warm-up",
                                 headers=headers, timeout=None) as client:
        for path, body in runs:
            response = await client.post(path, json=body)
            if response.status_code != 200 or '"error"' in response.text:
                raise RuntimeError(f"the warm-up request to {path} failed: "
                                   f"{response.status_code} {response.text[:300]}")
    return len(runs)


async def drain(state: ServerState) -> None:
    """Refuse new work at once (the caller set state.draining), let in-flight requests finish
    within shutdown_timeout, then stop the engine: requests still running end with an error
    chunk and [DONE]."""
    timeout = state.settings.shutdown_timeout
    log.info("draining: %d requests in flight, up to %.0f s", state.in_flight, timeout)
    if state.in_flight:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.idle.wait(), timeout)
    if state.engine is not None:
        await state.engine.shutdown()
    # Give the responses of aborted requests a moment to be written out.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(state.idle.wait(), 5.0)
    log.info("drained")
