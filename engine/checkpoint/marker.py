"""The mark `gptq-serve synth` leaves beside a checkpoint it wrote: its weights are random.

A synthetic checkpoint is in exactly the real on-disk format, so nothing in config.json or the
weights tells it apart (and config.json stays as TheBloke's repos have it). The marker is a
file of its own, ``gptq-serve-synth.json``, naming what was drawn; the server reads it to warn
that such a model's text is gibberish. Torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path

SYNTH_MARKER_FILE = "gptq-serve-synth.json"
_GENERATOR = "gptq-serve synth"


def write_synth_marker(folder: Path, spec: dict[str, object]) -> None:
    """Mark ``folder`` as written by the synthesiser with random weights drawn per ``spec``."""
    body = {"generator": _GENERATOR, "weights": "random", "spec": spec}
    (folder / SYNTH_MARKER_FILE).write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")


def has_random_weights(folder: Path) -> bool:
    """Whether ``folder`` carries the synthesiser's marker (a folder name proves nothing: a
    real checkpoint may be called anything, a synthetic one too)."""
    path = folder / SYNTH_MARKER_FILE
    if not path.is_file():
        return False
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return (isinstance(body, dict) and body.get("generator") == _GENERATOR
            and body.get("weights") == "random")
