"""Grammar compilation off the engine loop: a worker pool, a time limit, a cache.

Compiling builds llguidance's token-level matcher for a constraint over the model's vocabulary
(the lexer and the token trie walk); it takes about a millisecond for common schemas and is
bounded by ``GrammarLimits``' fuel. It runs in worker threads (llguidance drops the GIL while it
builds) so the engine core's loop keeps stepping other requests meanwhile.

Threading: ``submit`` and the cache are used by the engine core's loop only; workers only run
``_build``. The cache holds one pristine matcher per (kind, text); each sequence gets a
``deep_copy`` of it (a microsecond), so a schema sent again, or by the n choices of one request,
compiles once.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance

from engine.params import Constraint
from engine.structured.grammar import GrammarError, GrammarLimits, describe, to_grammar

log = logging.getLogger(__name__)


class GrammarCompiler:
    def __init__(self, tokenizer: llguidance.LLTokenizer, limits: GrammarLimits,
                 max_workers: int = 2, cache_size: int = 256) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        self.cache_size = cache_size
        self._pool = ThreadPoolExecutor(max_workers=max_workers,
                                        thread_name_prefix="grammar-compile")
        # (kind, text) -> the compile of that constraint (running or done), least recent first.
        self._cache: OrderedDict[tuple[str, str], Future[llguidance.LLMatcher]] = OrderedDict()

    def submit(self, constraint: Constraint) -> Future[llguidance.LLMatcher]:
        """The compile of ``constraint``: already done when it is cached. Its result is the
        pristine matcher; never consume tokens with it, ``deep_copy`` it. A failed compile
        raises GrammarError from ``result()``."""
        key = constraint.key
        future = self._cache.get(key)
        if future is not None:
            self._cache.move_to_end(key)
            return future
        future = self._pool.submit(self._build, constraint)
        self._cache[key] = future
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return future

    def forget(self, constraint: Constraint) -> None:
        """Drop a constraint from the cache (its compile timed out: the next request for it
        compiles again rather than wait on this one)."""
        self._cache.pop(constraint.key, None)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _build(self, constraint: Constraint) -> llguidance.LLMatcher:
        grammar = to_grammar(constraint)
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0,
                                       limits=self.limits.parser_limits())
        if matcher.is_error():
            raise GrammarError(describe(constraint, matcher.get_error()), constraint.param)
        return matcher
