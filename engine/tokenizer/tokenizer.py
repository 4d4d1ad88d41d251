"""The tokenizer facade: a transformers tokenizer plus per-token tables built once at load.

Llama 2's vocabulary is sentencepiece: a piece's spaces are written '▁', and characters outside
the vocabulary fall back to one ``<0xNN>`` piece per UTF-8 byte. Per-token text (for logprobs)
and per-token bytes are looked up in tables made at construction, because they are asked for
every generated token.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from tokenizers import Tokenizer as RustTokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from engine.faults import FaultPlan

# sentencepiece's word-boundary marker: a space in the text.
SPIECE_SPACE = "\u2581"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class Tokenizer:
    """Implements ``engine.client.TokenizerLike`` over a transformers tokenizer.

    Thread use: the tables are immutable; ``decode`` only reads the underlying tokenizer, so
    one thread may decode while another encodes.
    """

    def __init__(self, hf: PreTrainedTokenizerBase, faults: FaultPlan | None = None) -> None:
        if hf.eos_token_id is None:
            raise ValueError("the tokenizer defines no EOS token; generation could never stop")
        self._hf = hf
        # Test-only fault hooks (engine/faults.py); None in production.
        self._faults = faults if faults is not None and faults.active else None
        # The Rust tokenizer behind a fast tokenizer: its decode is what hf.decode runs, minus
        # about 6 us of Python per call, which matters at two window decodes per token.
        backend = getattr(hf, "backend_tokenizer", None)
        self._backend = backend if isinstance(backend, RustTokenizer) else None
        self._vocab_size = len(hf)
        self._eos_token_id: int = hf.eos_token_id
        self._bos_token_id: int | None = hf.bos_token_id
        special = set(hf.all_special_ids)
        special.update(i for i, t in hf.added_tokens_decoder.items() if t.special)
        self._special_ids = frozenset(i for i in special if 0 <= i < self._vocab_size)
        pieces = hf.convert_ids_to_tokens(list(range(self._vocab_size)))
        byte_values: list[int | None] = []
        strings: list[str] = []
        raw: list[bytes] = []
        for token_id, piece in enumerate(pieces):
            value, text, data = self._describe(token_id, piece or "")
            byte_values.append(value)
            strings.append(text)
            raw.append(data)
        self._byte_values: tuple[int | None, ...] = tuple(byte_values)
        self._byte_ids = frozenset(i for i, v in enumerate(byte_values) if v is not None)
        self._strings: tuple[str, ...] = tuple(strings)
        self._bytes: tuple[bytes, ...] = tuple(raw)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str],
                        faults: FaultPlan | None = None) -> Tokenizer:
        """Load the tokenizer files of a local checkpoint folder (or a hub repo id)."""
        return cls(AutoTokenizer.from_pretrained(str(path)), faults)

    @property
    def hf(self) -> PreTrainedTokenizerBase:
        """The transformers tokenizer underneath (the grammar engine reads its vocabulary)."""
        return self._hf

    @property
    def vocab_size(self) -> int:
        """Every id below this is a token: the base vocabulary plus added tokens."""
        return self._vocab_size

    @property
    def eos_token_id(self) -> int:
        return self._eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def chat_template(self) -> str | None:
        template = self._hf.chat_template
        if isinstance(template, dict):  # named templates: the unnamed one is "default"
            template = template.get("default")
        return template if isinstance(template, str) else None

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids that ``decode(..., skip_special_tokens=True)`` leaves out."""
        return self._special_ids

    @property
    def byte_token_ids(self) -> frozenset[int]:
        """Ids of the ``<0xNN>`` byte-fallback pieces."""
        return self._byte_ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` they start with BOS, as Llama's
        prompts must, even where a checkpoint's tokenizer_config forgets to ask for it."""
        if self._faults is not None:
            self._faults.check_tokenize(text)
        ids: list[int] = self._hf.encode(text, add_special_tokens=add_special_tokens)
        bos = self._bos_token_id
        if add_special_tokens and bos is not None and ids[:1] != [bos]:
            ids.insert(0, bos)
        return ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of ``token_ids``. A leading '▁' of the first piece is dropped, as Llama
        does after BOS. Never cleans up spaces: they are part of the text."""
        ids = list(token_ids)
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return self._hf.decode(ids, skip_special_tokens=skip_special_tokens,
                               clean_up_tokenization_spaces=False)

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        """Each token's own text, OpenAI style: '▁' as a space, a byte piece that is not a
        whole character as ``bytes:\\xNN``, a special token as its name."""
        strings = self._strings
        return [strings[self._check(t)] for t in token_ids]

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes this token contributes: a byte piece its byte, any other piece its
        text with '▁' as a space, a special token its name."""
        return self._bytes[self._check(token_id)]

    def byte_value(self, token_id: int) -> int | None:
        """The byte of a ``<0xNN>`` piece; None for any other token."""
        return self._byte_values[self._check(token_id)]

    def _check(self, token_id: int) -> int:
        # Negative ids would silently index the tables from the end.
        if not 0 <= token_id < self._vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary "
                             f"[0, {self._vocab_size})")
        return token_id

    def _describe(self, token_id: int, piece: str) -> tuple[int | None, str, bytes]:
        """(byte value or None, OpenAI token string, contributed bytes) of one token."""
        if token_id in self._special_ids:
            return None, piece, piece.encode("utf-8")
        match = _BYTE_PIECE.fullmatch(piece)
        if match is not None:
            value = int(match.group(1), 16)
            # An ASCII byte is a whole character; any other byte is only part of one.
            text = chr(value) if value < 0x80 else f"bytes:\\x{value:02x}"
            return value, text, bytes([value])
        text = piece.replace(SPIECE_SPACE, " ")
        return None, text, text.encode("utf-8")
