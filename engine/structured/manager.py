"""The engine core's grammar state: compiles off the loop, holds requests back until their
grammar is ready, keeps one matcher per constrained sequence, and builds each step's masks.

Owned by LLMEngine and used by the engine core's loop only (the compile workers touch nothing
here). A request whose grammar is still compiling is not in the scheduler yet, so it holds no
KV blocks; it joins the waiting queue, in arrival order among the requests that became ready,
as soon as its compile is done.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass

import llguidance
import llguidance.hf

from engine.core.scheduler import SchedulerOutput
from engine.core.sequence import Sequence
from engine.params import Constraint
from engine.structured.compiler import GrammarCompiler
from engine.structured.grammar import GrammarError, GrammarLimits
from engine.structured.matchers import SequenceGrammar, StepGrammars
from engine.tokenizer.tokenizer import Tokenizer


@dataclass(frozen=True)
class StructuredConfig:
    limits: GrammarLimits = GrammarLimits()
    # Seconds a grammar may take to compile before its request is refused.
    compile_timeout_s: float = 10.0
    cache_size: int = 256
    compile_workers: int = 2
    # Threads computing token masks and advancing matchers (None: 80% of the cores, at most
    # 32, as llguidance sizes its pool); 1 does it on the engine core's loop.
    mask_threads: int | None = None


@dataclass
class _Compiling:
    seq: Sequence
    constraint: Constraint
    future: Future[llguidance.LLMatcher]
    deadline: float


@dataclass(frozen=True)
class Admitted:
    """What ``poll`` resolved: sequences ready to schedule, and refused ones with why."""

    ready: list[Sequence]
    refused: list[tuple[Sequence, GrammarError]]


class StructuredOutputs:
    def __init__(self, tokenizer: Tokenizer, config: StructuredConfig) -> None:
        self.config = config
        # The vocabulary as llguidance sees it: each token's bytes (sentencepiece's '▁' as a
        # space, <0xNN> pieces as their byte), EOS allowed only where the grammar accepts.
        ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer.hf, n_vocab=tokenizer.vocab_size,
                                                    eos_token=tokenizer.eos_token_id)
        self.compiler = GrammarCompiler(ll_tokenizer, config.limits, config.compile_workers,
                                        config.cache_size)
        threads = config.mask_threads or default_mask_threads()
        self.executor = llguidance.LLExecutor(threads) if threads > 1 else None
        self._compiling: dict[int, _Compiling] = {}  # seq_id ->, in arrival order
        self._grammars: dict[int, SequenceGrammar] = {}  # seq_id -> of admitted sequences

    @property
    def has_compiling(self) -> bool:
        return bool(self._compiling)

    @property
    def num_compiling(self) -> int:
        return len(self._compiling)

    @property
    def grammar_count(self) -> int:
        """Matchers held for admitted sequences (0 once every constrained request ended)."""
        return len(self._grammars)

    def add(self, seq: Sequence) -> SequenceGrammar | None:
        """Start ``seq``'s grammar. Returns its matcher at once when the compile is cached (the
        caller schedules it now); None means it compiles and ``poll`` will return it."""
        constraint = seq.params.constraint
        assert constraint is not None
        future = self.compiler.submit(constraint)
        if future.done() and future.exception() is None:
            return self._admit(seq, future)
        self._compiling[seq.seq_id] = _Compiling(
            seq, constraint, future, time.monotonic() + self.config.compile_timeout_s)
        return None

    def poll(self, wait_s: float = 0.0) -> Admitted:
        """Sequences whose compile ended (or ran out of time); with ``wait_s`` > 0, first wait
        up to that long for one to end (the engine does so only when it has nothing to step)."""
        if wait_s > 0 and self._compiling:
            wait([c.future for c in self._compiling.values()], timeout=wait_s,
                 return_when=FIRST_COMPLETED)
        ready: list[Sequence] = []
        refused: list[tuple[Sequence, GrammarError]] = []
        now = time.monotonic()
        for seq_id, c in list(self._compiling.items()):
            if c.future.done():
                del self._compiling[seq_id]
                error = c.future.exception()
                if error is None:
                    self._admit(c.seq, c.future)
                    ready.append(c.seq)
                else:
                    refused.append((c.seq, _as_grammar_error(error, c.constraint)))
            elif now > c.deadline:
                del self._compiling[seq_id]
                self.compiler.forget(c.constraint)
                refused.append((c.seq, GrammarError(
                    f"the grammar of '{c.constraint.param}' did not compile within "
                    f"{self.config.compile_timeout_s:g} s; simplify it",
                    c.constraint.param, code="grammar_too_complex")))
        return Admitted(ready, refused)

    def advance(self, tokens: list[tuple[int, int]]) -> dict[int, bool]:
        """Consume each (seq_id, token) of a step in the sequence's matcher, the constrained
        ones only, in parallel; seq_id -> whether its grammar accepted the token."""
        pairs = [(seq_id, self._grammars[seq_id], token) for seq_id, token in tokens
                 if seq_id in self._grammars]
        if self.executor is None or len(pairs) == 1:
            return {seq_id: grammar.accept(token) for seq_id, grammar, token in pairs}
        ok = self.executor.consume_token_par([(g.matcher, t) for _, g, t in pairs])
        return {seq_id: accepted for (seq_id, _, _), accepted in zip(pairs, ok, strict=True)}

    def grammar(self, seq_id: int) -> SequenceGrammar | None:
        return self._grammars.get(seq_id)

    def release(self, seq_id: int) -> None:
        self._compiling.pop(seq_id, None)
        self._grammars.pop(seq_id, None)

    def for_step(self, out: SchedulerOutput) -> StepGrammars | None:
        """The step's grammars, by scheduled index; None (no work at all) when no sampling
        sequence of the step is constrained."""
        if not self._grammars:
            return None
        found = {i: g for i, s in enumerate(out.scheduled)
                 if s.samples and (g := self._grammars.get(s.seq.seq_id)) is not None}
        return StepGrammars(self.executor, found) if found else None

    def shutdown(self) -> None:
        self.compiler.shutdown()

    def _admit(self, seq: Sequence, future: Future[llguidance.LLMatcher]) -> SequenceGrammar:
        grammar = SequenceGrammar(future.result().deep_copy())
        self._grammars[seq.seq_id] = grammar
        return grammar


def default_mask_threads() -> int:
    return max(1, min(32, int(0.8 * (os.cpu_count() or 1))))


def _as_grammar_error(error: BaseException, constraint: Constraint) -> GrammarError:
    if isinstance(error, GrammarError):
        return error
    return GrammarError(f"the grammar of '{constraint.param}' failed to compile: {error}",
                        constraint.param)
