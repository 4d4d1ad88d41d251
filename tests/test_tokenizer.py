"""The tokenizer facade over a Llama-style sentencepiece tokenizer trained on the spot."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from engine.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "spaces  between   words and a trailing one ",
    "Naïve café owners in Zürich said “hi” — twice…",
    "日本語のテキスト and 東京 and 中文字符",
    "Emoji: 😀🚀👍🏽 and math ∑∫√ and runes ᚠᚢᚦ",
    "line one\nline two\n\n\tindented\r\nend",
    "def f(x):\n    return x + 42",
]


def byte_id(tok: Tokenizer, value: int) -> int:
    return next(i for i in tok.byte_token_ids if tok.byte_value(i) == value)


def test_ids_and_sizes_follow_llama(tok: Tokenizer) -> None:
    assert tok.vocab_size == 1000
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.special_token_ids == frozenset({0, 1, 2})
    # 256 byte pieces right after the specials, as in Llama 2 (where "\n" is <0x0A> = 13).
    assert sorted(tok.byte_token_ids) == list(range(3, 259))
    assert tok.encode("\n", add_special_tokens=False)[-1] == 13
    assert tok.chat_template is None


def test_encode_adds_bos_only_with_special_tokens(tok: Tokenizer) -> None:
    with_bos = tok.encode("Hello world")
    plain = tok.encode("Hello world", add_special_tokens=False)
    assert with_bos == [1, *plain]
    assert tok.encode("") == [1]
    assert tok.encode("", add_special_tokens=False) == []


@pytest.mark.parametrize("text", TEXTS)
def test_text_round_trips(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_decode_drops_the_first_leading_space_and_can_keep_special_tokens(
        tok: Tokenizer) -> None:
    world = tok.encode("world", add_special_tokens=False)
    assert tok.token_strings(world)[0] == " world"
    assert tok.decode(world) == "world"  # Llama's rule for the first piece
    hello = tok.encode("Hello", add_special_tokens=False)
    assert tok.decode(hello + world) == "Hello world"
    assert tok.decode([1, *hello, 2], skip_special_tokens=False) == "<s> Hello</s>"
    assert tok.decode([1, *hello, 2]) == "Hello"


def test_byte_pieces_form_a_character_only_together(tok: Tokenizer) -> None:
    ri = [byte_id(tok, b) for b in "日".encode()]  # <0xE6><0x97><0xA5>
    assert tok.decode(ri) == "日"
    assert tok.decode(ri[:2]) == "\ufffd\ufffd"
    assert tok.token_strings(ri) == ["bytes:\\xe6", "bytes:\\x97", "bytes:\\xa5"]
    assert [tok.token_bytes(i) for i in ri] == [b"\xe6", b"\x97", b"\xa5"]
    assert tok.token_strings([byte_id(tok, 0x0A), byte_id(tok, 0x41)]) == ["\n", "A"]


def test_decode_is_transformers_decode(tok: Tokenizer, tokenizer_dir: Path) -> None:
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 20))]
        for skip in (True, False):
            assert tok.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip,
                                                      clean_up_tokenization_spaces=False)


def test_token_tables_describe_every_token(tok: Tokenizer) -> None:
    strings = tok.token_strings(range(tok.vocab_size))
    x = tok.encode("x", add_special_tokens=False)
    for token_id, s in enumerate(strings):
        assert "\u2581" not in s
        if token_id in tok.special_token_ids:
            assert tok.token_bytes(token_id) == s.encode()
            # Skipped tokens vanish from decoded text; every other token shows.
            assert tok.decode([*x, token_id, *x]) == tok.decode(x + x)
        elif token_id in tok.byte_token_ids:
            assert tok.token_bytes(token_id) == bytes([tok.byte_value(token_id) or 0])
        else:
            assert tok.byte_value(token_id) is None
            assert tok.token_bytes(token_id) == s.encode()
            assert tok.decode([*x, token_id, *x]) == "x" + s + " x"


@pytest.mark.parametrize("text", [*TEXTS, "  leading spaces"])
def test_token_bytes_spell_the_text(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    # sentencepiece's dummy prefix: text is encoded as if it started with a space (the fast
    # tokenizer adds none when it already does).
    spelled = text if text.startswith(" ") else " " + text
    assert b"".join(tok.token_bytes(i) for i in ids) == spelled.encode()


def test_out_of_vocabulary_ids_are_refused(tok: Tokenizer) -> None:
    for bad in (-1, tok.vocab_size):
        with pytest.raises(ValueError):
            tok.token_strings([bad])
        with pytest.raises(ValueError):
            tok.token_bytes(bad)


def test_chat_template_comes_from_tokenizer_config(tokenizer_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "with-template"
    shutil.copytree(tokenizer_dir, folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    config["chat_template"] = template
    config_path.write_text(json.dumps(config))
    assert Tokenizer.from_pretrained(str(folder)).chat_template == template
