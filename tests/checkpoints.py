"""Synthetic checkpoints for tests, each configuration written once per root folder.

The suite passes a session-scoped temporary root (see conftest.py), so every (preset, bits,
group size, act-order, seed) is synthesised once per test session and shared by every test.
"""

from __future__ import annotations

from pathlib import Path

from engine.checkpoint.arch import CONFIG_FILE
from engine.checkpoint.synth import SynthSpec, synthesize


def checkpoint_name(*, bits: int, group_size: int | None, act_order: bool, preset: str,
                    seed: int) -> str:
    group = "none" if group_size is None else str(group_size)
    return f"{preset}-{bits}bit-g{group}-act{int(act_order)}-seed{seed}"


def make_checkpoint(root: Path, *, bits: int, group_size: int | None, act_order: bool,
                    preset: str = "tiny", seed: int = 0) -> Path:
    """The folder of a synthetic GPTQ checkpoint under ``root``, synthesised on first use.

    synthesize() writes config.json last, so its presence means a complete checkpoint; a folder
    left half-written by an interrupted run is simply written again.
    """
    folder = root / checkpoint_name(bits=bits, group_size=group_size, act_order=act_order,
                                    preset=preset, seed=seed)
    if not (folder / CONFIG_FILE).is_file():
        synthesize(SynthSpec(preset=preset, bits=bits, group_size=group_size,
                             act_order=act_order, seed=seed), folder)
    return folder
