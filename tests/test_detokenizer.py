"""The incremental detokenizer against full decodes of a Llama-style tokenizer."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from engine.tokenizer import IncrementalDetokenizer, Tokenizer

UNICODE_POOL = (["the", "quick", "brown", "fox", "café", "naïve", "Zürich", " ", "  ", "\n",
                 "\n\n", "\t", ".", ",", "42", "7"]
                + list("日本語中文字符東京😀🚀👍🏽∑∫√ᚠᚢᚦ€—…ßøåéèñ"))


def byte_ids(tok: Tokenizer, data: bytes) -> list[int]:
    by_value = {tok.byte_value(i): i for i in tok.byte_token_ids}
    return [by_value[b] for b in data]


def pieces(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def expected_text(tok: Tokenizer, prompt: Sequence[int], output: Sequence[int],
                  skip: bool) -> str:
    before = tok.decode(prompt, skip)
    full = tok.decode([*prompt, *output], skip)
    assert full.startswith(before)
    return full[len(before):]


def stream(tok: Tokenizer, prompt: Sequence[int], output: Sequence[int], skip: bool = True,
           chunks: Sequence[int] | None = None) -> list[str]:
    """Feed ``output`` in chunks of the given sizes (default one token each) and check after
    every step that what was returned is final: a prefix of the whole output's text."""
    want = expected_text(tok, prompt, output, skip)
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas: list[str] = []
    sizes = list(chunks) if chunks is not None else [1] * len(output)
    pos = 0
    for size in sizes:
        deltas.append(detok.add(output[pos:pos + size]))
        pos += size
        assert want.startswith("".join(deltas)), (prompt, output, deltas)
    assert pos == len(output)
    deltas.append(detok.flush())
    assert "".join(deltas) == want, (prompt, output, deltas)
    return deltas


def test_the_first_output_token_keeps_its_space_after_the_prompt(tok: Tokenizer) -> None:
    assert "".join(stream(tok, tok.encode("Hello"), pieces(tok, "world"))) == " world"


def test_the_first_token_after_a_lone_bos_loses_its_space(tok: Tokenizer) -> None:
    output = pieces(tok, "Hello world")
    assert tok.token_strings(output)[0].startswith(" ")
    assert "".join(stream(tok, [tok.bos_token_id or 1], output)) == "Hello world"


def test_the_space_is_kept_after_a_prompt_ending_in_skipped_tokens(tok: Tokenizer) -> None:
    prompt = [*tok.encode("Hello"), *[tok.eos_token_id] * 7]
    assert "".join(stream(tok, prompt, pieces(tok, "world"))) == " world"


def test_plain_pieces_stream_at_once(tok: Tokenizer) -> None:
    output = pieces(tok, "the quick brown fox jumps")
    deltas = stream(tok, tok.encode("Once"), output)
    assert deltas[:-1] == tok.token_strings(output) and deltas[-1] == ""


def test_byte_pieces_make_one_character_together(tok: Tokenizer) -> None:
    ri = byte_ids(tok, "日".encode())
    output = [*ri, *pieces(tok, "x")]
    # Held while the run of byte pieces may still change; released by the next piece.
    assert stream(tok, tok.encode("Say"), output) == ["", "", "", "日 x", ""]
    assert stream(tok, tok.encode("Say"), ri) == ["", "", "", "日"]


def test_a_newline_byte_is_released_by_the_next_piece(tok: Tokenizer) -> None:
    output = pieces(tok, "a\nb")
    assert tok.token_strings(output) == [" a", "\n", "b"]
    assert stream(tok, tok.encode("Say"), output) == [" a", "", "\nb", ""]


def test_an_invalid_byte_run_is_never_shown_half_way(tok: Tokenizer) -> None:
    # "A" alone is valid, then a stray continuation byte turns the whole run into U+FFFD.
    output = [*byte_ids(tok, b"A\x80"), *pieces(tok, "ok")]
    assert "".join(stream(tok, tok.encode("Say"), output)) == "\ufffd\ufffd ok"


def test_special_tokens_are_skipped_or_shown(tok: Tokenizer) -> None:
    eos = tok.eos_token_id
    output = [*pieces(tok, "one"), eos, *pieces(tok, "two")]
    assert "".join(stream(tok, tok.encode("Count"), output)) == " one two"
    assert "".join(stream(tok, tok.encode("Count"), output, skip=False)) == " one</s> two"
    # A skipped token does not end a run of byte pieces: they still join into one character.
    ri = byte_ids(tok, "日".encode())
    assert "".join(stream(tok, tok.encode("Say"), [ri[0], eos, ri[1], ri[2]])) == "日"


def test_a_prompt_ending_inside_a_character(tok: Tokenizer) -> None:
    ri = byte_ids(tok, "日".encode())
    prompt = [*tok.encode("Say"), ri[0]]
    detok = IncrementalDetokenizer(tok, prompt)
    text = detok.add(ri[1:]) + detok.add(pieces(tok, "x")) + detok.flush()
    assert text == "日 x"


def test_flush_ends_the_stream(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, tok.encode("Hi"))
    assert detok.add(byte_ids(tok, b"\n")) == ""
    assert detok.flush() == "\n"
    assert detok.flush() == ""
    with pytest.raises(RuntimeError):
        detok.add([5])


def _random_output(tok: Tokenizer, rng: random.Random) -> list[int]:
    vocab = tok.vocab_size
    normal = [i for i in range(vocab)
              if i not in tok.byte_token_ids and i not in tok.special_token_ids]
    high_bytes = [i for i in tok.byte_token_ids if (tok.byte_value(i) or 0) >= 0x80]
    kind = rng.randrange(4)
    n = rng.randint(0, 40)
    if kind == 0:  # anything at all, specials and stray bytes included
        return [rng.randrange(vocab) for _ in range(n)]
    if kind == 1:  # mostly bytes: valid and invalid runs
        return [rng.choice(high_bytes) if rng.random() < 0.6 else rng.choice(normal)
                for _ in range(n)]
    text = "".join(rng.choice(UNICODE_POOL) for _ in range(n))
    ids = pieces(tok, text)
    if kind == 3:  # valid text with special tokens dropped in, even inside byte runs
        for _ in range(rng.randint(1, 4)):
            ids.insert(rng.randint(0, len(ids)), rng.choice(sorted(tok.special_token_ids)))
    return ids


def _random_prompt(tok: Tokenizer, rng: random.Random) -> list[int]:
    bos = tok.bos_token_id or 1
    choice = rng.randrange(3)
    if choice == 0:
        return [bos]
    text = "".join(rng.choice(UNICODE_POOL) for _ in range(rng.randint(1, 12)))
    prompt = tok.encode(text)
    if choice == 2:
        prompt += pieces(tok, " " + rng.choice(["Answer:", "x", "the"]))
    # A prompt ending in byte pieces may join the output's first bytes into one run (the one
    # documented exception); end it on a plain piece.
    if prompt[-1] in tok.byte_token_ids:
        prompt += pieces(tok, "the")
    return prompt


def test_random_sequences_stream_exactly_the_decoded_text(tok: Tokenizer) -> None:
    rng = random.Random(1234)
    for _ in range(400):
        prompt = _random_prompt(tok, rng)
        output = _random_output(tok, rng)
        sizes: list[int] = []
        while sum(sizes) < len(output):
            sizes.append(min(rng.randint(1, 4), len(output) - sum(sizes)))
        for skip in (True, False):
            stream(tok, prompt, output, skip=skip, chunks=sizes)


def test_work_per_token_is_bounded(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a few tokens around the new ones are decoded, however long the output grows."""
    decoded = 0
    real_decode = tok.decode

    def counting_decode(token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        nonlocal decoded
        decoded += len(token_ids)
        return real_decode(token_ids, skip_special_tokens)

    monkeypatch.setattr(tok, "decode", counting_decode)
    text = " ".join(rng_word for rng_word in ["alpha", "café", "日本", "x\ny", "😀"] * 200)
    output = pieces(tok, text)
    detok = IncrementalDetokenizer(tok, tok.encode("Long prompt " * 100))
    out = "".join(detok.add([t]) for t in output) + detok.flush()
    assert out == " " + text
    assert decoded <= 8 * len(output)
