"""The server's logs: one handler for every logger, text or one JSON object a line, the request
id on every record of a request, download progress bars only for a person at a terminal. The
real engine's start-up stages in JSON are checked in tests/test_server_real_engine.py."""

from __future__ import annotations

import contextvars
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars

from app.logs import REQUEST_ID, configure_logging
from tests.fake_engine import FAULT_MARKER, ServerProcess


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def root_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Restore the root logger and huggingface_hub's progress-bar switch afterwards."""
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    enable_progress_bars()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    enable_progress_bars()


@pytest.mark.parametrize(("stream", "log_format", "bars"), [
    (Terminal(), "text", True), (io.StringIO(), "text", False), (Terminal(), "json", False)])
def test_progress_bars_only_for_text_on_a_terminal(root_logging: None, stream: io.StringIO,
                                                   log_format: str, bars: bool) -> None:
    configure_logging("info", log_format, stream)  # type: ignore[arg-type]
    assert are_progress_bars_disabled() is not bars


def test_json_lines_carry_the_request_id_and_no_colour_copy(root_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream)
    log = logging.getLogger("uvicorn.error")

    def in_request() -> None:
        REQUEST_ID.set("req-abc")
        log.warning("inside %s", "a request", extra={"color_message": "\x1b[1minside\x1b[0m"})

    contextvars.copy_context().run(in_request)
    log.info("outside")
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert inside["message"] == "inside a request" and inside["request_id"] == "req-abc"
    assert inside["level"] == "WARNING" and inside["logger"] == "uvicorn.error"
    assert "color_message" not in inside and "timestamp" in inside
    assert "request_id" not in outside


def test_a_json_server_logs_the_request_id_of_a_failed_request(tiny_checkpoint: Path,
                                                                tmp_path: Path) -> None:
    srv = ServerProcess.fake(tiny_checkpoint, tmp_path / "server.log", "--log-format", "json",
                             "--served-model-name", "tiny")
    with srv.start():
        r = httpx.post(srv.url + "/v1/completions", headers={"X-Request-Id": "trace-42"},
                       json={"model": "tiny", "prompt": f"{FAULT_MARKER} now", "max_tokens": 4})
        assert r.status_code == 500 and r.headers["x-request-id"] == "trace-42"
    records = [json.loads(line) for line in srv.log().splitlines()]
    failed = [r for r in records if r["level"] == "ERROR"]
    assert failed and all(r["request_id"] == "trace-42" for r in failed)
    assert {"app.server", "app.lifecycle", "uvicorn.error"} <= {r["logger"] for r in records}
    assert all("request_id" not in r for r in records if r["logger"] == "app.lifecycle")
