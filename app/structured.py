"""Structured-output request fields -> the engine's Constraint, checked before anything queues.

Accepted spellings, at most one per request: OpenAI's ``response_format`` (``json_object``,
``json_schema``; an extension on /v1/completions), vLLM's ``structured_outputs`` (``json``,
``regex``, ``choice``, ``grammar``, ``json_object``) and vLLM's older ``guided_json``,
``guided_regex``, ``guided_choice`` and ``guided_grammar``. A JSON schema is first checked
against its metaschema (``jsonschema``: "not a valid JSON Schema"), then by the grammar engine
(llguidance: keywords it cannot enforce, regex features, size), so every refusal is a 400 that
names the field.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import jsonschema

from app.errors import OpenAIError, bad_request
from app.protocol.common import SamplingFields
from engine.params import Constraint, ConstraintKind
from engine.structured.grammar import GrammarError, GrammarLimits, check

_SCHEMA_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_STRUCTURED_KEYS = {"json": ConstraintKind.JSON_SCHEMA, "regex": ConstraintKind.REGEX,
                    "choice": ConstraintKind.CHOICE, "grammar": ConstraintKind.GRAMMAR,
                    "json_object": ConstraintKind.JSON_OBJECT}


def request_constraint(req: SamplingFields) -> Constraint | None:
    """The request's own output constraint, or None. Two spellings at once are a 400."""
    found: list[Constraint] = []
    if req.response_format is not None:
        c = response_format_constraint(req.response_format)
        if c is not None:
            found.append(c)
    if req.structured_outputs is not None:
        found.append(_structured_outputs(req.structured_outputs))
    if req.guided_json is not None:
        found.append(json_schema_constraint(req.guided_json, "guided_json"))
    if req.guided_regex is not None:
        found.append(_text(ConstraintKind.REGEX, req.guided_regex, "guided_regex"))
    if req.guided_choice is not None:
        found.append(choice_constraint(req.guided_choice, "guided_choice"))
    if req.guided_grammar is not None:
        found.append(_text(ConstraintKind.GRAMMAR, req.guided_grammar, "guided_grammar"))
    if len(found) > 1:
        raise bad_request(f"'{found[1].param}' cannot be combined with '{found[0].param}': "
                          "give one output constraint", found[1].param)
    return found[0] if found else None


def response_format_constraint(value: Any) -> Constraint | None:
    param = "response_format"
    if not isinstance(value, dict):
        raise bad_request("'response_format' must be an object", param)
    kind = value.get("type")
    if kind == "text":
        _only_keys(value, {"type"}, param)
        return None
    if kind == "json_object":
        _only_keys(value, {"type"}, param)
        return Constraint(ConstraintKind.JSON_OBJECT, "", param)
    if kind != "json_schema":
        raise bad_request("'response_format.type' must be one of text, json_object, "
                          f"json_schema; got {kind!r}", "response_format.type")
    _only_keys(value, {"type", "json_schema"}, param)
    spec = value.get("json_schema")
    where = "response_format.json_schema"
    if not isinstance(spec, dict):
        raise bad_request(f"'{where}' is required for type json_schema and must be an object",
                          where)
    _only_keys(spec, {"name", "description", "schema", "strict"}, where)
    name = spec.get("name")
    if not isinstance(name, str) or not _SCHEMA_NAME.match(name):
        raise bad_request(f"'{where}.name' must be 1-64 letters, digits, '_' or '-'",
                          f"{where}.name")
    if spec.get("strict") not in (None, True, False):
        raise bad_request(f"'{where}.strict' must be a boolean", f"{where}.strict")
    if "schema" not in spec:  # OpenAI allows it: any JSON object then
        return Constraint(ConstraintKind.JSON_OBJECT, "", param)
    return json_schema_constraint(spec["schema"], param, f"{where}.schema")


def json_schema_constraint(schema: Any, param: str, where: str | None = None) -> Constraint:
    """A JSON-schema constraint; ``schema`` a JSON object or its text (vLLM takes both)."""
    where = where or param
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise bad_request(f"'{where}' is not valid JSON: {exc}", param) from exc
    check_schema(schema, where, param)
    return Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(schema, ensure_ascii=False), param)


def check_schema(schema: Any, where: str, param: str) -> None:
    """``schema`` must be a JSON Schema by its own metaschema (the draft its ``$schema``
    names, 2020-12 by default)."""
    if not isinstance(schema, dict):
        raise bad_request(f"'{where}' must be a JSON Schema object", param)
    validator = jsonschema.validators.validator_for(schema, jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        at = "/".join(str(p) for p in exc.path)
        raise bad_request(f"'{where}' is not a valid JSON Schema: {exc.message}"
                          + (f" (at {at})" if at else ""), param) from exc


def choice_constraint(choices: Any, param: str) -> Constraint:
    if (not isinstance(choices, list) or not choices
            or not all(isinstance(c, str) and c for c in choices)):
        raise bad_request(f"'{param}' must be a non-empty list of non-empty strings", param)
    return Constraint(ConstraintKind.CHOICE, json.dumps(choices, ensure_ascii=False), param)


def _structured_outputs(value: Any) -> Constraint:
    param = "structured_outputs"
    if not isinstance(value, dict):
        raise bad_request("'structured_outputs' must be an object", param)
    unknown = set(value) - set(_STRUCTURED_KEYS)
    if unknown:
        raise bad_request(f"'structured_outputs' supports {', '.join(_STRUCTURED_KEYS)}; "
                          f"not {', '.join(sorted(unknown))}",
                          f"{param}.{sorted(unknown)[0]}")
    given = [k for k in _STRUCTURED_KEYS if value.get(k) not in (None, False)]
    if len(given) != 1:
        raise bad_request("'structured_outputs' takes exactly one of "
                          f"{', '.join(_STRUCTURED_KEYS)}", param)
    key = given[0]
    where = f"{param}.{key}"
    item = value[key]
    if key == "json":
        return json_schema_constraint(item, param, where)
    if key == "choice":
        return choice_constraint(item, param)
    if key == "json_object":
        if item is not True:
            raise bad_request(f"'{where}' must be true", where)
        return Constraint(ConstraintKind.JSON_OBJECT, "", param)
    return _text(_STRUCTURED_KEYS[key], item, param, where)


def _text(kind: ConstraintKind, value: Any, param: str, where: str | None = None) -> Constraint:
    if not isinstance(value, str) or not value:
        raise bad_request(f"'{where or param}' must be a non-empty string", param)
    return Constraint(kind, value, param)


def _only_keys(value: Mapping[str, Any], allowed: set[str], where: str) -> None:
    extra = set(value) - allowed
    if extra:
        raise bad_request(f"unrecognized field(s) in '{where}': {', '.join(sorted(extra))}",
                          where)


class ConstraintChecker:
    """Checks constraints with the grammar engine before they reach the engine: the text's size,
    then compilation without a tokenizer in a worker thread, within a time limit. Verdicts are
    cached by (kind, text): clients send the same schema or tools with every request."""

    def __init__(self, limits: GrammarLimits, max_bytes: int, timeout_s: float,
                 cache_size: int = 512) -> None:
        self.limits = limits
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.cache_size = cache_size
        self._verdicts: OrderedDict[tuple[str, str], str | None] = OrderedDict()

    async def check(self, constraint: Constraint) -> None:
        size = len(constraint.text.encode("utf-8"))
        if size > self.max_bytes:
            raise bad_request(f"the constraint in '{constraint.param}' is {size} bytes; at "
                              f"most {self.max_bytes} are allowed", constraint.param,
                              code="grammar_too_large")
        key = constraint.key
        if key not in self._verdicts:
            self._remember(key, await self._compile(constraint))
        self._verdicts.move_to_end(key)
        message = self._verdicts[key]
        if message is not None:
            raise bad_request(message, constraint.param)

    async def _compile(self, constraint: Constraint) -> str | None:
        try:
            await asyncio.wait_for(asyncio.to_thread(check, constraint, self.limits),
                                   self.timeout_s)
        except GrammarError as exc:
            return str(exc)
        except TimeoutError as exc:
            # Not cached: the next request may find the machine less busy.
            raise OpenAIError(400, f"the constraint in '{constraint.param}' did not compile "
                              f"within {self.timeout_s:g} s; simplify it",
                              param=constraint.param, code="grammar_too_complex") from exc
        return None

    def _remember(self, key: tuple[str, str], verdict: str | None) -> None:
        self._verdicts[key] = verdict
        while len(self._verdicts) > self.cache_size:
            self._verdicts.popitem(last=False)
