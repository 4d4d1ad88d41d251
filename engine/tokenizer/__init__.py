"""Tokenizer facade, incremental detokenizer and stop-string matcher."""

from engine.tokenizer.detokenizer import IncrementalDetokenizer
from engine.tokenizer.stop import StopResult, StopStringMatcher
from engine.tokenizer.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer", "StopResult", "StopStringMatcher", "Tokenizer"]
