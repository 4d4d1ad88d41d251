"""A small Llama-style sentencepiece tokenizer, trained on the spot from locally generated text.

Synthetic checkpoints need a real tokenizer with the quirks of Llama 2's: BPE, <unk>/<s>/</s> at
ids 0/1/2, 256 <0xNN> byte-fallback pieces (so any UTF-8 text round-trips, including characters
never seen in training), a dummy "▁" prefix, digits split one per piece. Only the vocabulary size
differs (about 1000 instead of 32000), which keeps training under a few seconds.

The corpus is built from an embedded word list with a seeded RNG, so the same vocabulary comes
out on every machine without downloading anything.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm

from engine.checkpoint.arch import write_json

# Ids fixed by Llama 2's tokenizer.model; the engine and the prompt templates rely on them.
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
DEFAULT_MODEL_MAX_LENGTH = 4096

_WORD_TEXT = """
the of and to in a is that for it as was with be by on not he i this are or his from at which
but have an they you were her she there one all we their has been if more when will would who
so no out up into do time can only new some could these may first then my than like other year
over such two people just also made make any after work way many well should because most state
very world back even good life before much through where each those know take system school day
house water number part place find high old great between long own small down why side left
always model server token stream request answer question reply prompt engine queue batch cache
layer weight scale group order value vector matrix kernel memory device river mountain forest
city garden window kitchen table chair letter market village harbour bridge castle island
summer winter autumn spring morning evening night sun moon star cloud rain snow wind storm
red green blue yellow orange purple black white silver golden quick brown fox jumps lazy dog
cat bird horse fish tree flower stone road music story song dance paint write read think learn
teach build open close begin end start stop walk run swim fly sing speak listen watch help
happy quiet bright dark warm cold early late simple strong gentle careful curious honest
however therefore although meanwhile perhaps really actually usually nearly together already
"""
_WORDS = tuple(_WORD_TEXT.split())

# Words outside ASCII so the vocabulary holds a few multi-byte pieces, as Llama 2's does; other
# scripts fall back to bytes, which is exactly what the detokenizer must handle.
_NON_ASCII = ["café", "naïve", "résumé", "über", "señor", "façade", "jalapeño", "Zürich",
              "日本語", "東京", "привет", "mañana", "😀", "🚀", "€", "—", "…"]
_PUNCT_END = [".", ".", ".", "!", "?", ":", ";"]
_PUNCT_MID = [",", ",", " -", " (", ")", "\"", "'s", "/"]


def _sentence(rng: random.Random) -> str:
    words: list[str] = []
    for _ in range(rng.randint(4, 16)):
        r = rng.random()
        if r < 0.06:
            words.append(rng.choice(_NON_ASCII))
        elif r < 0.14:
            # Numbers of every length: digits are split one per piece, like Llama's.
            words.append(str(rng.randint(0, 10 ** rng.randint(1, 6))))
        else:
            word = rng.choice(_WORDS)
            words.append(word.capitalize() if rng.random() < 0.1 else word)
        if rng.random() < 0.1:
            words[-1] += rng.choice(_PUNCT_MID)
    words[0] = words[0].capitalize()
    return " ".join(words) + rng.choice(_PUNCT_END)


def corpus(num_lines: int = 4000, seed: int = 0) -> Iterator[str]:
    """English-like lines: sentences, code-ish fragments and indented text (Llama keeps spaces)."""
    rng = random.Random(seed)
    for i in range(num_lines):
        line = " ".join(_sentence(rng) for _ in range(rng.randint(1, 3)))
        if i % 17 == 0:
            line = "    " + line
        if i % 23 == 0:
            name = f"{rng.choice(_WORDS)}_{rng.choice(_WORDS)}"
            line = f"def {name}(x): return x + {rng.randint(0, 99)}"
        yield line


# Up to this size the English-like corpus alone has enough distinct pieces to merge.
_SMALL_VOCAB = 2000


def _pseudo_words(rng: random.Random, count: int) -> list[str]:
    """Distinct pronounceable made-up words (2-4 syllables)."""
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    syllables += ["an", "en", "in", "on", "un", "ar", "er", "or", "st", "th"]
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))))
    return sorted(words)


def large_corpus(seed: int = 0) -> Iterator[str]:
    """The English-like corpus, then lines of made-up words: enough distinct pieces for BPE to
    reach a Llama-sized vocabulary (32000) in a couple of seconds."""
    yield from corpus(seed=seed)
    rng = random.Random(seed + 1)
    words = _pseudo_words(rng, 40000)
    for _ in range(30000):
        yield " ".join(rng.choice(words) for _ in range(12))


def _train_model(vocab_size: int) -> bytes:
    model = io.BytesIO()
    # Llama 2's trainer_spec, except vocab_size and the input; byte_fallback adds <0x00>..<0xFF>
    # right after the three specials, as in the real tokenizer.model.
    spm.SentencePieceTrainer.train(
        sentence_iterator=corpus() if vocab_size <= _SMALL_VOCAB else large_corpus(),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=0.99995,
        byte_fallback=True,
        split_digits=True,
        split_by_unicode_script=True,
        split_by_whitespace=True,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
        unk_surface=" \u2047 ",
        max_sentence_length=4192,
        num_threads=1,  # one thread: the merge order, hence the vocabulary, is reproducible
        minloglevel=2,
    )
    return model.getvalue()


def _added_token(content: str) -> dict[str, object]:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False,
            "rstrip": False, "single_word": False}


def tokenizer_config(model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> dict[str, object]:
    """tokenizer_config.json as Llama 2 repos ship it (non-legacy sentencepiece handling)."""
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": _added_token("<s>"),
        "clean_up_tokenization_spaces": False,
        "eos_token": _added_token("</s>"),
        "legacy": False,
        "model_max_length": model_max_length,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": _added_token("<unk>"),
    }


def _special_tokens_map() -> dict[str, object]:
    return {name: {k: v for k, v in _added_token(tok).items() if k != "__type"}
            for name, tok in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))}


def train_tokenizer(out_dir: Path, vocab_size: int = 1000,
                    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH) -> None:
    """Train the tokenizer and write tokenizer.model, tokenizer_config.json,
    special_tokens_map.json and tokenizer.json (the fast form, so loading needs no conversion).

    ``vocab_size`` must leave room above the 3 specials and 256 byte pieces for merges.
    """
    if vocab_size < 300:
        raise ValueError(f"vocab_size must be at least 300 (3 specials + 256 bytes + merges), "
                         f"got {vocab_size}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(_train_model(vocab_size))
    write_json(out_dir / "tokenizer_config.json", tokenizer_config(model_max_length))
    write_json(out_dir / "special_tokens_map.json", _special_tokens_map())
    _write_fast_tokenizer(out_dir)


def _write_fast_tokenizer(out_dir: Path) -> None:
    # Imported here: transformers is heavy and only this step needs it. Its converter reads the
    # vocabulary and merges out of tokenizer.model, as it would on every load without this file.
    from transformers import AutoTokenizer

    backend = AutoTokenizer.from_pretrained(str(out_dir)).backend_tokenizer
    spec = json.loads(backend.to_str())
    # Llama 2 repos ship the sentencepiece-exact pipeline: prepend "▁" to the whole text and
    # turn every space into "▁", no pre-tokenizer; ids then equal sentencepiece's for any text.
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    spec["pre_tokenizer"] = None
    write_json(out_dir / "tokenizer.json", spec)
