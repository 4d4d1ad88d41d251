"""Start-up (load, warm up, become ready) and graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from app.settings import Settings
from app.state import ServerState
from app.templates import load_template
from engine.client import EngineClient
from engine.params import SamplingParams

log = logging.getLogger(__name__)

T = TypeVar("T")


def build_engine(settings: Settings) -> EngineClient:
    """Load the real engine (blocking: run it in a thread). Imported here so that the app
    imports no torch until it loads a model."""
    start = time.monotonic()
    from engine.core.async_engine import AsyncEngine
    from engine.progress import timed_stage

    timed_stage(log, "engine", start, "torch and the engine imported")
    return AsyncEngine.from_config(settings.engine_config())


async def start(state: ServerState, engine: EngineClient | None) -> None:
    """Load the model (unless given), start the loop, warm up, then report ready."""
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
        if settings.warmup:
            t_warm = time.monotonic()
            lengths = await warm_up(engine, settings.max_num_batched_tokens)
            log.info("warm-up: %d generations (prompts of %s tokens) in %.1f s", len(lengths),
                     " and ".join(map(str, lengths)), time.monotonic() - t_warm,
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


async def warm_up(engine: EngineClient, chunk_tokens: int) -> list[int]:
    """Generations through the whole path before the first user arrives: a short prompt (decode
    kernels, graphs, sampler) and one longer than a step's token budget, so that a chunked
    prefill compiles its kernels now rather than during someone's first request; with LoRA
    adapters loaded, the short prompt once more with one of them (the LoRA kernels). Returns
    the prompts' lengths."""
    max_len = engine.model_info.max_model_len
    tok = engine.tokenizer
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    long_len = min(chunk_tokens + 16, max_len - params.max_tokens - 1)
    short = tok.encode("Hello world.")
    # Repeat the short prompt's ids rather than tokenising a long text only to cut it.
    filler = (short * (long_len // len(short) + 1))[:long_len]
    adapters = engine.lora_adapters()
    runs = [(short, None), (filler, None)] + ([(short, adapters[0].name)] if adapters else [])
    for i, (prompt, lora) in enumerate(runs):
        async for _ in engine.generate(prompt, params, f"warmup-{i}", lora=lora):
            pass
    return [len(prompt) for prompt, _ in runs]


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
