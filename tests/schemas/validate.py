"""Validate server responses against the trimmed OpenAI schemas in openai_schemas.yaml.

A copy of the team's shared OpenAI contract checker (shared/openai/validate.py), kept beside
the schemas so the suite is self-contained; only the formatting differs.

Usage (library): ``from tests.schemas.validate import validate``;
``validate("CreateChatCompletionResponse", obj)``.
Usage (CLI): ``python -m tests.schemas.validate SchemaName file.json``.
OpenAPI 3.0's ``nullable: true`` is rewritten into JSON Schema's ``anyOf[..., null]`` first.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

_DOC = yaml.safe_load((Path(__file__).with_name("openai_schemas.yaml")).read_text())


def _denull(o: Any) -> Any:
    if isinstance(o, list):
        return [_denull(x) for x in o]
    if not isinstance(o, dict):
        return o
    o = {k: _denull(v) for k, v in o.items()}
    if o.pop("nullable", False) is True:
        return {"anyOf": [o, {"type": "null"}]}
    o.pop("nullable", None)
    return o


_ROOT = _denull({"components": _DOC["components"]})
_ROOT["components"]["schemas"]["CreateCompletionStreamChunk"] = _denull(
    _DOC["x-derived"]["CreateCompletionStreamChunk"]["schema"])
_URI = "urn:openai-schemas"
_REG = Registry().with_resource(
    _URI, Resource.from_contents(_ROOT, default_specification=DRAFT202012))


def validator(name: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"{_URI}#/components/schemas/{name}"}, registry=_REG)


def errors(name: str, obj: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator(name).iter_errors(obj)]


def validate(name: str, obj: Any) -> None:
    errs = errors(name, obj)
    if errs:
        raise AssertionError(f"{name} invalid:\n  " + "\n  ".join(errs))


if __name__ == "__main__":
    schema_name, path = sys.argv[1], sys.argv[2]
    errs = errors(schema_name, json.loads(Path(path).read_text()))
    print("OK" if not errs else "\n".join(errs))
    sys.exit(1 if errs else 0)
