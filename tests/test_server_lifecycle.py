"""The server process from the outside: the port opens before the model is loaded (/health 200,
/ready and work 503 until loaded), settings from env vars and flags, metrics behind a key, CORS,
the exported metric names, and the `gptq-serve` command itself."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.lifecycle import in_daemon_thread
from app.settings import SETTING_GROUPS, Settings, flag_name
from tests.fake_engine import ServerProcess, free_port, scrape
from tests.vllm_names import alias_problems

KEY = "sk-file-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LOAD_DELAY = 4.0
ORIGIN = "https://app.example"

# The metrics a dashboard and alerts are written against: these exact names and types.
CONTRACT = {
    "gptq_num_requests_running": "gauge", "gptq_num_requests_waiting": "gauge",
    "gptq_kv_cache_usage_ratio": "gauge", "gptq_kv_cache_blocks_total": "gauge",
    "gptq_kv_cache_blocks_free": "gauge", "gptq_kv_cache_blocks_cached": "gauge",
    "gptq_prefix_cache_queries": "counter", "gptq_prefix_cache_hits": "counter",
    "gptq_prompt_tokens": "counter",
    "gptq_generation_tokens": "counter", "gptq_num_preemptions": "counter",
    "gptq_engine_steps": "counter", "gptq_request_success": "counter",
    "gptq_requests_rejected": "counter", "gptq_http_requests": "counter",
    "gptq_time_to_first_token_seconds": "histogram",
    "gptq_inter_token_latency_seconds": "histogram",
    "gptq_e2e_request_latency_seconds": "histogram",
    "gptq_request_queue_time_seconds": "histogram", "gptq_request_prompt_tokens": "histogram",
    "gptq_request_generation_tokens": "histogram",
    "gptq_http_request_duration_seconds": "histogram", "gptq_model_info": "gauge",
    "gptq_ready": "gauge", "gptq_draining": "gauge",
    "gptq_request_prefill_time_seconds": "histogram",
    "gptq_request_decode_time_seconds": "histogram",
    "gptq_request_inference_time_seconds": "histogram",
    "gptq_request_time_per_output_token_seconds": "histogram",
}


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    """A server whose 'model' takes LOAD_DELAY s to load, configured through the environment
    (GPTQ_PORT is overridden by the --port flag the harness passes: flags win)."""
    folder = tmp_path_factory.mktemp("lifecycle")
    (folder / "keys").write_text(f"{KEY}\n")
    env = {"GPTQ_API_KEY_FILE": str(folder / "keys"), "GPTQ_SERVED_MODEL_NAME": "first,second",
           "GPTQ_METRICS_REQUIRE_AUTH": "true", "GPTQ_CORS_ORIGINS": ORIGIN, "GPTQ_PORT": "9"}
    srv = ServerProcess.fake(tiny_checkpoint, folder / "server.log", load_delay=LOAD_DELAY,
                             env=env)
    with srv.start(wait="/health"):
        yield srv


def test_the_port_opens_before_the_model_is_loaded(server: ServerProcess) -> None:
    assert httpx.get(server.url + "/health").status_code == 200
    ready = httpx.get(server.url + "/ready")
    assert ready.status_code == 503 and ready.json()["status"] == "loading"
    refused = httpx.post(server.url + "/v1/completions", headers=AUTH,
                         json={"model": "first", "prompt": "x"})
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["code"] == "model_not_ready"
    server.wait_for("/ready", timeout=LOAD_DELAY + 10)
    done = httpx.post(server.url + "/v1/completions", headers=AUTH,
                      json={"model": "second", "prompt": "x", "max_tokens": 2})
    assert done.status_code == 200


def test_settings_come_from_the_environment(server: ServerProcess) -> None:
    server.wait_for("/ready", timeout=LOAD_DELAY + 10)
    models = httpx.get(server.url + "/v1/models", headers=AUTH).json()
    assert [m["id"] for m in models["data"]] == ["first", "second"]
    assert httpx.get(server.url + "/v1/models").status_code == 401


def test_metrics_need_the_key_when_configured(server: ServerProcess) -> None:
    assert httpx.get(server.url + "/metrics").status_code == 401
    samples = scrape(server.url, headers=AUTH)
    assert samples["gptq_ready"] == 1 and samples["gptq_draining"] == 0
    assert samples['gptq_requests_rejected_total{reason="not_ready"}'] >= 1


def test_every_contract_metric_is_exported_with_its_type(server: ServerProcess) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    server.wait_for("/ready", timeout=LOAD_DELAY + 10)
    stream = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, json={
        "model": "first", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
        "stream": True})
    assert stream.status_code == 200
    text = httpx.get(server.url + "/metrics", headers=AUTH).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in CONTRACT.items():
        assert name in families and families[name].type == kind, name
    routes = {s.labels["route"] for s in families["gptq_http_requests"].samples}
    assert "/v1/chat/completions" in routes and "/v1/models" in routes
    assert not any("first" in r or "second" in r for r in routes), "route templates only"
    (info,) = families["gptq_model_info"].samples
    assert info.labels["linear_backend"] == "fake" and info.labels["bits"] == "4"
    assert info.labels["group_size"] == "32" and info.labels["act_order"] == "true"
    # vLLM's names, labelled with the first served model name.
    assert alias_problems(text, "first") == []


def test_cors_is_served_only_to_the_configured_origin(server: ServerProcess) -> None:
    preflight = {"Access-Control-Request-Method": "POST"}
    ok = httpx.options(server.url + "/v1/chat/completions",
                       headers={"Origin": ORIGIN, **preflight})
    assert ok.headers.get("access-control-allow-origin") == ORIGIN
    other = httpx.options(server.url + "/v1/chat/completions",
                          headers={"Origin": "https://evil.example", **preflight})
    assert other.headers.get("access-control-allow-origin") is None


# ---- the command ----------------------------------------------------------------------------


def gptq_serve(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    command = str(Path(sys.executable).with_name("gptq-serve"))
    return subprocess.run([command, *argv], capture_output=True, text=True, timeout=timeout)


def test_serve_help_groups_every_flag_under_its_heading() -> None:
    # That it stays fast (no torch import) is test_the_app_never_imports_torch's concern.
    out = gptq_serve("serve", "--help")
    assert out.returncode == 0
    text = out.stdout
    # argparse prints each group as a "title:" line followed by the group's flags.
    starts = [text.index(f"\n{group.title}:\n") for group in SETTING_GROUPS]
    assert starts == sorted(starts), "groups out of order"
    for group, start, end in zip(SETTING_GROUPS, starts, [*starts[1:], len(text)], strict=True):
        section = text[start:end]
        for name in group.fields:
            flag = re.escape(flag_name(name))
            assert re.search(rf"^ +{flag}(?=[ ,\n])", section, re.MULTILINE), \
                f"{flag_name(name)} is not listed under {group.title}"
    assert sum(len(g.fields) for g in SETTING_GROUPS) == len(Settings.model_fields)


def test_the_app_never_imports_torch() -> None:
    code = ("import pkgutil, importlib, sys, app\n"
            "for m in pkgutil.walk_packages(app.__path__, 'app.'):\n"
            "    importlib.import_module(m.name)\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_invalid_settings_exit_2_with_a_message() -> None:
    out = gptq_serve("serve", "--port", "0", "--block-size", "12")
    assert out.returncode == 2
    assert "port" in out.stderr and "block_size" in out.stderr


def test_a_model_that_cannot_load_exits_1(tmp_path: Path) -> None:
    out = gptq_serve("serve", "--model", str(tmp_path / "missing"), "--offline",
                     "--device", "cpu", "--port", str(free_port()), timeout=120)
    assert out.returncode == 1
    assert "start-up failed" in out.stderr


def test_synth_and_bench_delegate_to_the_engine(tmp_path: Path) -> None:
    out = gptq_serve("synth", "--help")
    assert out.returncode == 0 and "--group-size" in out.stdout
    out = gptq_serve("bench", "--help")
    assert out.returncode == 0 and "usage: gptq-serve bench" in out.stdout


async def test_the_model_loads_in_a_daemon_thread() -> None:
    """A SIGTERM during a long load must not wait for it: the loader thread is a daemon."""
    release = threading.Event()

    def slow_load(x: int) -> int:
        assert threading.current_thread().daemon
        release.wait(5)
        return x + 1

    pending = asyncio.create_task(in_daemon_thread(slow_load, 41))
    await asyncio.sleep(0.05)
    assert any(t.name == "model-load" and t.daemon for t in threading.enumerate())
    release.set()
    assert await pending == 42

    def broken() -> None:
        raise FileNotFoundError("no such checkpoint")

    with pytest.raises(FileNotFoundError):
        await in_daemon_thread(broken)
