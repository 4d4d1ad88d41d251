"""A newcomer's first commands: what `make demo` / `make run` install (the runtime only) and
what `make test` adds, how PORT / HOST and GPTQ_PORT / GPTQ_HOST reach the server, a real
`make demo` answering on a free port, and the packaging metadata pip reads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
from packaging.licenses import canonicalize_license_expression
from packaging.requirements import Requirement

from tests.fake_engine import free_port

REPO = Path(__file__).resolve().parents[1]


def make(*args: str, env: dict[str, str] | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["make", "-C", str(REPO), "--no-print-directory", *args],
                          capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, **(env or {})})


def dry_run(target: str, tmp_path: Path, *args: str,
            env: dict[str, str] | None = None) -> list[str]:
    """The commands `make TARGET` runs from a fresh clone (-B: nothing built yet), unrun."""
    out = make("-n", "-B", target, f"VENV={tmp_path / 'venv'}", *args, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def serve_command(lines: list[str]) -> list[str]:
    (command,) = [line.split() for line in lines if " serve " in line]
    return command


def test_demo_and_run_install_the_runtime_only(tmp_path: Path) -> None:
    for target in ("demo", "run"):
        lines = dry_run(target, tmp_path)
        installs = [line for line in lines if "pip install" in line]
        assert any(line.endswith(("-e .", "-e '.[cuda]'")) for line in installs), lines
        assert not [line for line in lines if "[dev" in line or "checkov" in line], target
    lines = dry_run("test", tmp_path)
    assert any("-e '.[dev]'" in line for line in lines)
    assert any("checkov" in line for line in lines)


def test_port_and_host_given_to_make_become_flags(tmp_path: Path) -> None:
    command = serve_command(dry_run("demo", tmp_path, "PORT=8080", "HOST=127.0.0.1"))
    assert command[-4:] == ["--port", "8080", "--host", "127.0.0.1"]
    assert serve_command(dry_run("run", tmp_path, "PORT=9000"))[-2:] == ["--port", "9000"]


def test_without_them_the_servers_own_settings_apply(tmp_path: Path) -> None:
    # A HOST in the environment is often just the machine's name: it must not become --host.
    env = {"PORT": "1234", "HOST": "some-machine", "GPTQ_PORT": "9001"}
    command = serve_command(dry_run("demo", tmp_path, env=env))
    assert "--port" not in command and "--host" not in command


def test_make_demo_answers_on_the_port_gptq_port_names(tmp_path: Path) -> None:
    """The real target over this interpreter's environment (its install steps taken as done:
    the dry runs above cover them), on a free port given as GPTQ_PORT."""
    port = free_port()
    log_path = tmp_path / "demo.log"
    stamp = Path(sys.prefix) / "bin" / ".installed-runtime"
    env = {**os.environ, "GPTQ_PORT": str(port), "GPTQ_HOST": "127.0.0.1",
           "OMP_NUM_THREADS": "1"}
    with log_path.open("wb") as log:
        # A session of its own, so that the SIGTERM below reaches make and the server alike.
        proc = subprocess.Popen(
            ["make", "-C", str(REPO), "--no-print-directory", "-o", str(stamp), "demo",
             f"VENV={sys.prefix}", f"DEMO_DIR={tmp_path / 'demo-model'}"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, log_path)
        r = httpx.post(url + "/v1/completions", timeout=60,
                       json={"model": "demo", "prompt": "Once upon a time", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["model"] == "demo", r.text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    text = log_path.read_text()
    assert f"serving demo at {url}/v1:" in text
    assert "random weights" in text and "gibberish" in text


def wait_ready(proc: subprocess.Popen[bytes], url: str, log_path: Path,
               timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log_path.read_text()
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"not ready in {timeout} s:\n{log_path.read_text()}")


def test_readme_says_the_demo_text_is_gibberish() -> None:
    readme = (REPO / "README.md").read_text()
    demo = readme[readme.index("`make demo`"):readme.index("## Documentation")]
    assert "random" in demo and "gibberish" in demo


def test_the_license_is_an_spdx_expression() -> None:
    """The SPDX string form (PEP 639), which setuptools reads without the deprecation warnings
    the old table form gives; it needs setuptools 77 or newer to build."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    license_ = project["project"]["license"]
    assert isinstance(license_, str) and canonicalize_license_expression(license_) == license_
    (setuptools,) = [Requirement(r) for r in project["build-system"]["requires"]
                     if Requirement(r).name == "setuptools"]
    assert "76.9" not in setuptools.specifier and "77.0" in setuptools.specifier
