"""The Triton kernels (GPTQ matrix products, paged decode attention, grouped LoRA deltas, the
fused rotary and cache write)
checked on the CPU through Triton's interpreter, so every change to them is tested without a
GPU. Each check runs in its own process: TRITON_INTERPRET must be set before the kernels are
defined."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("check", ["gemm_check", "attention_check", "lora_check", "fused_check"])
def test_kernel_in_interpreter(check: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", f"tests.interp.{check}"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "FAIL" not in result.stdout
