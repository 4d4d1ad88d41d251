"""Auth against a real server process (over the fake engine) with API keys: no spelling of a
path gets past the key, keys are compared in constant time, keys and prompt text never reach the
log at INFO, and no error body shows a traceback or a file path."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.middleware import api_key_matches
from tests.fake_engine import ServerProcess
from tests.reliability import HOST, assert_clean_error, raw_exchange, request_head

KEY = "sk-auth-0123456789abcdef"
OTHER_KEY = "sk-auth-second"
MODEL = "tiny"
PROMPT = "the secret plan is written in purple ink"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("auth") / "server.log"
    with ServerProcess.fake(tiny_checkpoint, log, "--served-model-name", MODEL,
                            "--api-key", KEY, "--api-key", OTHER_KEY, "--log-level", "info",
                            "--metrics-require-auth").start() as srv:
        yield srv


# Each target names a protected route however it is spelled; none may be served without a key.
TARGETS = ["/v1/models", "//v1/models", "/v1//models", "/v1/./models", "/v1/../v1/models",
           "/./v1/models", "/v1%2Fmodels", "/%76%31/models", "/V1/MODELS", "/v1/models/",
           "/v1/models?x=1", "/v1/models;x", "/v1/models%00", "/v1/models/tiny",
           "/v1/models/../models", "http://127.0.0.1/v1/models", "/health/../v1/models",
           "/ready/../v1/models", "/metrics", "/metrics/", "/Metrics", "/openapi.json",
           "/docs", "/tokenize", "/version", "/nothing"]


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "POST"])
@pytest.mark.parametrize("target", TARGETS)
async def test_no_path_spelling_gets_past_the_key(server: ServerProcess, method: str,
                                                  target: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": KEY}, {"Authorization": f"Bearer {KEY[:-1]}"},
                    {"Host": f"{HOST}/health"}):
        r = await raw_exchange(server.port, [request_head(method, target, headers)],
                               head_only=method == "HEAD", read_timeout=5)
        assert r.status in (400, 401), (method, target, headers, r.status, r.body[:200])
        if method != "HEAD":
            assert_clean_error(r.body)


def test_with_the_key_the_schema_is_served_and_the_docs_pages_are_off(
        server: ServerProcess) -> None:
    schema = httpx.get(server.url + "/openapi.json", headers=AUTH)
    assert schema.status_code == 200 and "/v1/chat/completions" in schema.json()["paths"]
    assert httpx.get(server.url + "/docs", headers=AUTH).status_code == 404
    assert httpx.get(server.url + "/redoc", headers=AUTH).status_code == 404
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 401


def test_keys_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every configured key is compared whichever matches, always as equal-length digests
    (hmac.compare_digest leaks only a length mismatch, and digests have none)."""
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr("app.middleware.hmac.compare_digest", counting)
    keys = ["k1", "a-much-longer-second-key", KEY]
    for supplied, expected in ((b"k1", True), (KEY.encode(), True), (b"x" * 500, False),
                               (b"", False)):
        calls.clear()
        assert api_key_matches(supplied, keys) is expected
        digest = hashlib.sha256().digest_size
        assert calls == [(digest, digest)] * len(keys)


def test_keys_and_prompts_never_reach_the_log_at_info(server: ServerProcess) -> None:
    for key in (KEY, OTHER_KEY, "sk-wrong-key-that-may-be-a-typo"):
        headers = {"Authorization": f"Bearer {key}"}
        httpx.post(server.url + "/v1/completions", headers=headers, timeout=30, json={
            "model": MODEL, "prompt": PROMPT, "max_tokens": 3})
        httpx.post(server.url + "/v1/chat/completions", headers=headers, timeout=30, json={
            "model": MODEL, "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 3, "stream": True})
        httpx.post(server.url + "/tokenize", headers=headers, json={"prompt": PROMPT})
        # Bad input and an engine fault (the fake's FAULT marker) are logged: still no text.
        httpx.post(server.url + "/v1/completions", headers=headers, json={
            "model": MODEL, "prompt": PROMPT, "temperature": 9})
        httpx.post(server.url + "/v1/completions", headers=headers, json={
            "model": MODEL, "prompt": f"FAULT {PROMPT}", "max_tokens": 3})
    log = server.log()
    assert "failed in the engine" in log, "the fault above should have been logged"
    for secret in (KEY, OTHER_KEY, "sk-wrong-key", PROMPT, "purple"):
        assert secret not in log, f"{secret!r} is in the server log"


def test_error_bodies_show_no_internals(server: ServerProcess) -> None:
    cases = [("POST", "/v1/completions", {"model": MODEL, "prompt": "FAULT x",
                                          "max_tokens": 3}),
             ("POST", "/v1/completions", {"model": MODEL, "prompt": [1, 99999]}),
             ("POST", "/v1/chat/completions", {"model": MODEL, "messages": "x"}),
             ("GET", "/v1/models/../../etc/passwd", None),
             ("POST", "/detokenize", {"tokens": [-1]})]
    for method, path, body in cases:
        r = httpx.request(method, server.url + path, json=body, headers=AUTH, timeout=30)
        assert r.status_code >= 400, (path, r.text)
        error = assert_clean_error(r.content)
        if r.status_code == 500:
            assert r.headers["x-request-id"] in error["message"]
