"""llguidance against xgrammar on our tokenizers: compile time, per-token mask time, memory,
byte-fallback handling and JSON-Schema coverage, printed as tables.

The figures in docs/structured-outputs.md come from this script. llguidance is a dependency;
xgrammar is not (it needs torch and triton at import), so measure it by installing it by hand
(``pip install --no-deps xgrammar apache-tvm-ffi``); the script skips a library it cannot import.

    python -m engine.bench.grammar_backends --tokenizer DIR [--tokenizer DIR ...]

Each walk samples uniformly among the allowed tokens with a fixed seed, so both libraries are
timed on outputs of the same kind (not the same text: their grammars differ in whitespace).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from transformers import AutoTokenizer, PreTrainedTokenizerBase

SCHEMAS: dict[str, dict[str, Any]] = {
    "flat object": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                       "ok": {"type": "boolean"}},
        "required": ["name", "age", "ok"], "additionalProperties": False},
    "nested (arrays, enums, anyOf, ranges, patterns)": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": "^[a-z]{3}-[0-9]{4}$"},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "level": {"type": "integer", "minimum": 1, "maximum": 5},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                     "minItems": 1, "maxItems": 4},
            "kind": {"enum": ["alpha", "beta", "gamma"]},
            "owner": {"type": "object", "properties": {
                "email": {"type": "string", "format": "email"},
                "since": {"type": "string", "format": "date"}},
                "required": ["email"], "additionalProperties": False},
            "value": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 8},
                                {"type": "null"}]}},
        "required": ["id", "score", "level", "tags", "kind", "owner", "value"],
        "additionalProperties": False},
    "tool calls (3 tools, array)": {
        "type": "array", "minItems": 1,
        "items": {"anyOf": [
            {"type": "object", "properties": {
                "name": {"const": name}, "arguments": params},
             "required": ["name", "arguments"], "additionalProperties": False}
            for name, params in (
                ("get_weather", {"type": "object", "properties": {
                    "city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                    "required": ["city"], "additionalProperties": False}),
                ("search", {"type": "object", "properties": {
                    "query": {"type": "string"}, "limit": {"type": "integer", "minimum": 1}},
                    "required": ["query"], "additionalProperties": False}),
                ("add", {"type": "object", "properties": {
                    "a": {"type": "number"}, "b": {"type": "number"}},
                    "required": ["a", "b"], "additionalProperties": False}))]}},
    "60 properties": {
        "type": "object",
        "properties": {f"field_{i}": {"type": ["string", "integer", "boolean"][i % 3]}
                       for i in range(60)},
        "required": [f"field_{i}" for i in range(60)], "additionalProperties": False},
}
# Keywords a user may send, and a schema using each; the table says which library takes it.
FEATURES: dict[str, dict[str, Any]] = {
    "$ref/$defs": {"$defs": {"p": {"type": "integer"}}, "type": "object",
                   "properties": {"a": {"$ref": "#/$defs/p"}}},
    "recursive $ref": {"$defs": {"n": {"type": "object", "properties": {
        "next": {"anyOf": [{"$ref": "#/$defs/n"}, {"type": "null"}]}}}}, "$ref": "#/$defs/n"},
    "oneOf": {"oneOf": [{"type": "integer"}, {"type": "string"}]},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}},
                        {"required": ["a"]}]},
    "const": {"const": "x"},
    "string pattern": {"type": "string", "pattern": "^[A-Z][a-z]+$"},
    "format date-time": {"type": "string", "format": "date-time"},
    "format uuid": {"type": "string", "format": "uuid"},
    "exclusiveMinimum": {"type": "number", "exclusiveMinimum": 0},
    "multipleOf": {"type": "integer", "multipleOf": 5},
    "prefixItems": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}]},
    "uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    "additionalProperties schema": {"type": "object",
                                    "additionalProperties": {"type": "integer"}},
    "patternProperties": {"type": "object", "patternProperties": {"^x": {"type": "integer"}}},
    "minProperties": {"type": "object", "minProperties": 1},
    "not": {"not": {"type": "string"}},
    "if/then/else": {"if": {"type": "integer"}, "then": {"minimum": 0}, "else": {}},
    "dependentRequired": {"type": "object", "dependentRequired": {"a": ["b"]}},
    "contains": {"type": "array", "contains": {"type": "integer"}},
}
BAD_INPUTS: dict[str, tuple[str, str]] = {
    "unknown type": ("json", json.dumps({"type": "objekt"})),
    "required is not a list": ("json", json.dumps({"type": "object", "required": "a"})),
    "minimum above maximum": ("json", json.dumps({"type": "integer", "minimum": 5,
                                                  "maximum": 1})),
    "dangling $ref": ("json", json.dumps({"$ref": "#/$defs/missing"})),
    "unbalanced regex": ("regex", "([a-z]+"),
}
REGEXES = {"date": r"\d{4}-\d{2}-\d{2}", "email-ish": r"[a-z0-9._]+@[a-z]+\.(com|org|net)"}


class Backend(Protocol):
    name: str

    def compile(self, kind: str, text: str) -> Any: ...

    def matcher(self, compiled: Any) -> Any: ...

    def allowed(self, matcher: Any) -> list[int]:
        """The allowed token ids (the mask computation is what is timed)."""
        ...

    def consume(self, matcher: Any, token: int) -> None: ...

    def done(self, matcher: Any) -> bool: ...


def _bits(mask: bytes | Any, vocab: int) -> list[int]:
    data = bytes(mask)
    return [i for i in range(vocab) if data[i >> 3] >> (i & 7) & 1]


class LLGuidance:
    name = "llguidance"

    def __init__(self, hf: PreTrainedTokenizerBase) -> None:
        import llguidance
        import llguidance.hf

        self.llg = llguidance
        start = time.perf_counter()
        self.tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=len(hf))
        self.init_s = time.perf_counter() - start
        self.vocab = len(hf)
        self.mask_s: list[float] = []

    def compile(self, kind: str, text: str) -> Any:
        M = self.llg.LLMatcher
        grammar = {"json": lambda: M.grammar_from_json_schema(text),
                   "json_object": lambda: M.grammar_from_json_schema('{"type": "object"}'),
                   "regex": lambda: M.grammar_from_regex(text),
                   "lark": lambda: M.grammar_from_lark(text)}[kind]()
        matcher = M(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def allowed(self, matcher: Any) -> list[int]:
        start = time.perf_counter()
        mask = matcher.compute_bitmask()
        self.mask_s.append(time.perf_counter() - start)
        return _bits(mask, self.vocab)

    def consume(self, matcher: Any, token: int) -> None:
        assert matcher.consume_token(token), matcher.get_error()

    def done(self, matcher: Any) -> bool:
        return matcher.is_stopped()


class XGrammar:
    name = "xgrammar"

    def __init__(self, hf: PreTrainedTokenizerBase) -> None:
        import torch
        import xgrammar

        self.xgr = xgrammar
        self.torch = torch
        start = time.perf_counter()
        info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=len(hf))
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.init_s = time.perf_counter() - start
        self.vocab = len(hf)
        self.bitmask = xgrammar.allocate_token_bitmask(1, self.vocab)
        self.mask_s: list[float] = []

    def compile(self, kind: str, text: str) -> Any:
        c = self.compiler
        return {"json": lambda: c.compile_json_schema(text),
                "json_object": c.compile_builtin_json_grammar,
                "regex": lambda: c.compile_regex(text),
                "lark": lambda: c.compile_grammar(text)}[kind]()

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def allowed(self, matcher: Any) -> list[int]:
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(self.bitmask)
        self.mask_s.append(time.perf_counter() - start)
        row = self.bitmask[0].numpy().tobytes()
        return _bits(row, self.vocab)

    def consume(self, matcher: Any, token: int) -> None:
        assert matcher.accept_token(token)

    def done(self, matcher: Any) -> bool:
        return matcher.is_terminated()


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def walk(backend: Backend, compiled: Any, eos: int, steps: int, rng: random.Random) -> int:
    """Random allowed tokens until the grammar ends or ``steps`` tokens; returns tokens taken.
    EOS is taken only when nothing else is allowed, so walks are long."""
    matcher = backend.matcher(compiled)
    for n in range(steps):
        allowed = backend.allowed(matcher)
        choices = [t for t in allowed if t != eos] or allowed
        if not choices:
            return n
        token = rng.choice(choices)
        backend.consume(matcher, token)
        if token == eos or backend.done(matcher):
            return n + 1
    return steps


def byte_fallback_check(backend: Backend, hf: PreTrainedTokenizerBase) -> str:
    """In a JSON string, a character spelt with <0xNN> pieces (Runic U+16A0, three bytes, in
    neither vocabulary): is each next byte allowed, is the closing quote refused half-way
    through the character, and allowed after it?"""
    compiled = backend.compile("json", json.dumps({"type": "object", "properties": {
        "a": {"type": "string"}}, "required": ["a"], "additionalProperties": False}))
    m = backend.matcher(compiled)
    vocab = hf.convert_ids_to_tokens(list(range(len(hf))))
    byte_id = {p: i for i, p in enumerate(vocab) if p.startswith("<0x") and len(p) == 6}
    for b in b'{"a":"x':  # as byte pieces: both vocabularies have them, without a space
        backend.consume(m, byte_id[f"<0x{b:02X}>"])
    quotes = {i for i, p in enumerate(vocab) if p == '"'}
    bytes_ok, quote_mid = True, False
    for k, b in enumerate("\u16a0".encode()):
        allowed = set(backend.allowed(m))
        bytes_ok &= byte_id[f"<0x{b:02X}>"] in allowed
        if k > 0:
            quote_mid |= bool(quotes & allowed)
        backend.consume(m, byte_id[f"<0x{b:02X}>"])
    quote_after = bool(quotes & set(backend.allowed(m)))
    return (f"each byte piece allowed: {bytes_ok}; quote allowed mid-character: {quote_mid}; "
            f"after it: {quote_after}")


@dataclass
class Report:
    lines: list[str]

    def row(self, *cells: object) -> None:
        self.lines.append("| " + " | ".join(str(c) for c in cells) + " |")


def measure(backend_cls: type, tokenizer_dir: Path, steps: int, report: Report) -> None:
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    gc.collect()
    before = rss_mb()
    backend = backend_cls(hf)
    tag = f"{backend.name}, {tokenizer_dir.name} (V={len(hf)})"
    report.row(tag, "tokenizer set-up", f"{backend.init_s * 1e3:.0f} ms",
               f"RSS +{rss_mb() - before:.0f} MB")
    rng = random.Random(0)
    cases = [(name, "json", json.dumps(s)) for name, s in SCHEMAS.items()]
    cases += [("json_object", "json_object", "")]
    cases += [(f"regex {name}", "regex", r) for name, r in REGEXES.items()]
    for name, kind, text in cases:
        mem = rss_mb()
        compiled, compile_s = timed(lambda k=kind, t=text: backend.compile(k, t))
        backend.mask_s.clear()
        taken = [walk(backend, compiled, hf.eos_token_id, steps, rng) for _ in range(3)]
        masks = sorted(backend.mask_s)
        p99 = masks[min(len(masks) - 1, int(len(masks) * 0.99))]
        report.row(tag, name, f"compile {compile_s * 1e3:.1f} ms",
                   f"mask mean {statistics.mean(masks) * 1e6:.0f} us, p99 {p99 * 1e6:.0f} us "
                   f"over {sum(taken)} tokens; RSS +{rss_mb() - mem:.0f} MB")
    report.row(tag, "byte fallback", byte_fallback_check(backend, hf), "")
    for name, schema in FEATURES.items():
        try:
            backend.compile("json", json.dumps(schema))
            verdict = "ok"
        except Exception as exc:
            verdict = "refused: " + str(exc).splitlines()[0][:110]
        report.row(tag, f"feature {name}", verdict, "")
    for name, (kind, text) in BAD_INPUTS.items():
        try:
            backend.compile(kind, text)
            verdict = "ACCEPTED"
        except Exception as exc:
            verdict = str(exc).replace("\n", " ")[:140]
        report.row(tag, f"bad input: {name}", verdict, "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokenizer", type=Path, action="append", required=True,
                   help="a folder with tokenizer.json (repeatable)")
    p.add_argument("--steps", type=int, default=200, help="tokens per random walk")
    p.add_argument("--backend", choices=["llguidance", "xgrammar"], action="append")
    args = p.parse_args(argv)
    wanted = args.backend or ["llguidance", "xgrammar"]
    report = Report([])
    for name, cls in (("llguidance", LLGuidance), ("xgrammar", XGrammar)):
        if name not in wanted:
            continue
        for folder in args.tokenizer:
            try:
                measure(cls, folder, args.steps, report)
            except ImportError as exc:
                report.row(name, "not installed", str(exc), "")
                break
    print("\n".join(report.lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
