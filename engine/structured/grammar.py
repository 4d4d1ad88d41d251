"""A Constraint as an llguidance grammar, and its validation. Torch-free.

The same translation serves both sides of the request: the HTTP layer calls ``check`` (no
tokenizer: what the grammar says, not how a vocabulary spells it) to answer 400 before anything
is queued, and the engine's compiler builds the token-level matcher from ``to_grammar``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import llguidance

from engine.params import Constraint, ConstraintKind

# JSON is generated compactly with one space after ':' and ',' ({"a": 1, "b": [2, 3]}): free
# whitespace lets a weak model spend its whole budget on newlines. A schema may override this
# with llguidance's own "x-guidance" key (applied after these defaults).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_ANY_OBJECT = '{"type": "object"}'
# Error texts from llguidance can quote the whole grammar; a client needs the first lines.
_MAX_MESSAGE = 600


class GrammarError(ValueError):
    """A constraint that cannot be enforced: invalid, unsupported, or over a limit.

    ``param`` names the request field it came from (OpenAI's error envelope carries it);
    the HTTP layer answers 400.
    """

    def __init__(self, message: str, param: str, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class GrammarLimits:
    """Bounds on the work one grammar may cost (llguidance's ParserLimits, narrowed).

    ``lexer_fuel`` bounds compilation (about 50k units per ms), ``step_fuel`` one token mask
    (about 14k per ms), ``max_grammar_size`` the grammar's symbols, ``max_lexer_states`` its
    memory (1-2 kB per state).
    """

    max_grammar_size: int = 200_000
    lexer_fuel: int = 1_000_000
    step_fuel: int = 200_000
    max_lexer_states: int = 100_000

    def parser_limits(self) -> llguidance.LLParserLimits:
        return llguidance.LLParserLimits(
            max_grammar_size=self.max_grammar_size, initial_lexer_fuel=self.lexer_fuel,
            step_lexer_fuel=self.step_fuel, max_lexer_states=self.max_lexer_states,
            verbose_errors=False)


def to_grammar(constraint: Constraint) -> str:
    """The llguidance grammar (its JSON form) of ``constraint``; GrammarError if the text is
    not even of its kind (a schema that is not JSON, a choice list that is not strings)."""
    M = llguidance.LLMatcher
    kind, text = constraint.kind, constraint.text
    try:
        if kind == ConstraintKind.JSON_SCHEMA:
            return M.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
        if kind == ConstraintKind.JSON_OBJECT:
            return M.grammar_from_json_schema(_ANY_OBJECT, defaults=JSON_OPTIONS)
        if kind == ConstraintKind.REGEX:
            return M.grammar_from_regex(text)
        if kind == ConstraintKind.CHOICE:
            return M.grammar_from_lark(choice_lark(_choices(text, constraint.param)))
        # Lark, or GBNF (llama.cpp's), which llguidance converts to Lark.
        return llguidance.grammar_from("grammar", text)
    except GrammarError:
        raise
    except ValueError as exc:
        raise GrammarError(describe(constraint, str(exc)), constraint.param) from exc


def choice_lark(choices: list[str]) -> str:
    """A Lark grammar accepting exactly one of ``choices`` (JSON string literals are Lark
    string literals, escapes included)."""
    return "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def check(constraint: Constraint, limits: GrammarLimits) -> None:
    """Raise GrammarError unless ``constraint`` compiles within ``limits``. No tokenizer: this
    checks the grammar itself (syntax, unsupported JSON Schema keywords, regex features, size)."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        to_grammar(constraint), None, limits=limits.parser_limits())
    if is_error:
        raise GrammarError(describe(constraint, messages[0]), constraint.param)


def describe(constraint: Constraint, message: str) -> str:
    what = {ConstraintKind.JSON_SCHEMA: "the JSON schema", ConstraintKind.REGEX: "the regex",
            ConstraintKind.GRAMMAR: "the grammar", ConstraintKind.CHOICE: "the choice list",
            ConstraintKind.JSON_OBJECT: "the JSON object grammar"}[constraint.kind]
    return f"{what} in '{constraint.param}' cannot be used: {_clip(message)}"


def _choices(text: str, param: str) -> list[str]:
    try:
        choices = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GrammarError(f"'{param}' must be a JSON list of strings", param) from exc
    if (not isinstance(choices, list) or not choices
            or not all(isinstance(c, str) and c for c in choices)):
        raise GrammarError(f"'{param}' must be a non-empty list of non-empty strings", param)
    return choices


def _clip(message: str) -> str:
    message = message.strip()
    return message if len(message) <= _MAX_MESSAGE else message[:_MAX_MESSAGE] + " ..."
