"""Stop-string matching across chunk boundaries."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import pytest

from engine.tokenizer.stop import StopResult, StopStringMatcher


def reference(text: str, stops: Sequence[str]) -> tuple[str, str | None]:
    """Read ``text`` one character at a time and stop at the first completed stop string
    (of two that end together, the longer)."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            stop = max(done, key=len)
            return text[:end - len(stop)], stop
    return text, None


def longest_pending_prefix(text: str, stops: Sequence[str]) -> int:
    return max((k for s in stops for k in range(1, len(s))
                if len(text) >= k and text.endswith(s[:k])), default=0)


def run_chunks(chunks: Sequence[str], stops: Sequence[str]) -> tuple[str, str | None]:
    """Feed the chunks and check, after every feed, that exactly the text that cannot still
    become a stop string has been emitted."""
    matcher = StopStringMatcher(stops)
    emitted = ""
    fed = ""
    for chunk in chunks:
        fed += chunk
        result = matcher.feed(chunk)
        emitted += result.text
        if result.stop is not None:
            return emitted, result.stop
        assert emitted == fed[:len(fed) - longest_pending_prefix(fed, stops)]
    return emitted + matcher.flush(), None


def all_splits(text: str, max_cuts: int) -> list[list[str]]:
    splits = []
    for n in range(max_cuts + 1):
        for cuts in itertools.combinations(range(1, len(text)), n):
            bounds = (0, *cuts, len(text))
            splits.append([text[a:b] for a, b in itertools.pairwise(bounds)])
    return splits


def test_a_stop_in_one_chunk_cuts_the_text_before_it() -> None:
    matcher = StopStringMatcher(["\n\n"])
    assert matcher.feed("Hello there.\n\nNext") == StopResult("Hello there.", "\n\n")
    assert matcher.stopped == "\n\n"
    with pytest.raises(RuntimeError):
        matcher.feed("more")


def test_only_a_possible_stop_prefix_is_held_back() -> None:
    matcher = StopStringMatcher(["world!"])
    assert matcher.feed("Hello wor") == StopResult("Hello ")
    assert matcher.feed("ld") == StopResult("")
    assert matcher.feed("s") == StopResult("worlds")
    assert matcher.feed(" w") == StopResult(" ")
    assert matcher.flush() == "w"
    assert matcher.flush() == ""


@pytest.mark.parametrize(("text", "stops"), [
    ("The answer is 42. ### User: next", ["### User:"]),
    ("abcabcabd tail", ["abd"]),
    ("aaab", ["aab"]),
    ("xabcd", ["abcd", "bc"]),  # "bc" is complete first
    ("xabc", ["bc", "abc"]),  # both end together: the longer, earlier-starting one
    ("one STOP two END", ["END", "STOP"]),
    ("no stop here", ["STOP", "xyz"]),
    ("ends with a partial ST", ["STOP"]),
    ("héllo wörld ✓ done", ["ö", "✓ d"]),
])
def test_every_chunking_gives_the_same_result(text: str, stops: list[str]) -> None:
    want = reference(text, stops)
    for chunks in all_splits(text, max_cuts=2):
        assert run_chunks(chunks, stops) == want, chunks
    assert run_chunks(list(text), stops) == want


def test_a_long_stop_over_many_one_character_feeds() -> None:
    stop = "<|end of the answer|>"
    text = "The result: 7 <|end of the ans <|end of the answer|> ignored"
    assert run_chunks(list(text), [stop, "zzz"]) == (text[:text.index(stop, 20)], stop)


def test_random_texts_stops_and_chunkings_match_the_reference() -> None:
    rng = random.Random(7)
    alphabet = "ab c"
    for _ in range(400):
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5)))
                 for _ in range(rng.randint(1, 4))]
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, max(0, len(text) - 1))))
        chunks = [text[a:b] for a, b in itertools.pairwise((0, *cuts, len(text)))]
        assert run_chunks(chunks, stops) == reference(text, stops), (text, stops, chunks)


def test_duplicate_stops_are_one_and_empty_stops_are_refused() -> None:
    assert StopStringMatcher(["a", "b", "a"]).stops == ("a", "b")
    with pytest.raises(ValueError):
        StopStringMatcher(["ok", ""])
