"""Incremental detokenisation: token ids in, text that will never change out.

The prefix-offset / read-offset scheme of vLLM and TGI: each step decodes a small window
``ids[prefix_offset:end]`` and returns what it adds to the text of ``ids[prefix_offset:
read_offset]``, the part already returned. Decoding a window rather than single tokens keeps
sentencepiece's spaces right (a window's first '▁' is dropped by the decoder exactly as in its
prefix, so their difference keeps it), and the window stays a few tokens long, so each step is
O(1) amortised.

What may be returned (``end``): the decoder turns a run of consecutive ``<0xNN>`` byte pieces
into text all at once, and if the run is not valid UTF-8 every byte of it becomes U+FFFD, so
one more byte can turn already valid text into U+FFFD, or three U+FFFD into one character.
Text is therefore returned only up to the last token that ends a run: a token that is neither a
byte piece nor a skipped special token (skipped tokens vanish before decoding, so a run goes on
across them). The trailing run is held back until a piece ends it or the request ends.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.tokenizer.tokenizer import Tokenizer

# Prompt tokens decoded together with the first output tokens, so the first output token's
# leading space comes out as it reads after the prompt (as vLLM does).
_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    """Streams the text of a request's generated tokens.

    Invariants: everything returned by ``add`` and ``flush``, concatenated, is the text the
    output adds after the prompt, ``decode(prompt + output)[len(decode(prompt)):]`` with the
    given ``skip_special_tokens`` (so prompt "Hello" then "▁world" gives " world", and the first
    token after a lone BOS loses its leading space, as Llama decodes it); every returned
    character is final (a later token never changes it).

    The one exception: a prompt that ends with byte pieces that the output's first byte pieces
    join into one run (the prompt ends inside a multi-byte character, or the output starts with
    a stray byte). The run's text then changes the prompt's last characters, which were already
    shown; the output's text starts at the first character that differs.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int],
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # Tokens that end no byte run: byte pieces, and special tokens while they are skipped.
        self._transparent = (tokenizer.byte_token_ids | tokenizer.special_token_ids
                             if skip_special_tokens else tokenizer.byte_token_ids)
        # ids[prefix_offset:read_offset] has been returned; ids[read_offset:] is pending.
        # Only the ids from prefix_offset on are kept: older ones never matter again.
        self._ids: list[int] = list(prompt_token_ids)
        self._read_offset = len(self._ids)
        start = max(self._read_offset - _PROMPT_CONTEXT, 0)
        text = self._decode(start, self._read_offset)
        # The window must start on text: the decoder drops the first leading space of the
        # window, which has to fall inside the part already returned, or at the very start of
        # the sequence where a full decode drops it too.
        while start > 0 and not text:
            start = max(start - _PROMPT_CONTEXT, 0)
            text = self._decode(start, self._read_offset)
        self._prefix_offset = start
        self._prefix_text = text  # decode(ids[prefix_offset:read_offset])
        self._finished = False

    def add(self, token_ids: Sequence[int]) -> str:
        """Append generated tokens; return the text that became final."""
        if self._finished:
            raise RuntimeError("the detokenizer was flushed; the request has ended")
        self._ids.extend(token_ids)
        end = len(self._ids)
        transparent = self._transparent
        while end > self._read_offset and self._ids[end - 1] in transparent:
            end -= 1
        if end <= self._read_offset:
            return ""
        return self._advance(end)

    def flush(self) -> str:
        """The text still held back (a trailing byte run), at the end of the request."""
        if self._finished:
            return ""
        self._finished = True
        if len(self._ids) <= self._read_offset:
            return ""
        return self._advance(len(self._ids))

    def _advance(self, end: int) -> str:
        """Return the text of ids[read_offset:end] and move the window up to ``end``."""
        text = self._decode(self._prefix_offset, end)
        prefix = self._prefix_text
        if text.startswith(prefix):
            delta = text[len(prefix):]
        else:  # only when the prompt ended inside a character (see the class docstring)
            same = next((i for i, (a, b) in enumerate(zip(text, prefix, strict=False))
                         if a != b), min(len(text), len(prefix)))
            delta = text[same:]
        # Slide the window to start at the old read offset, if its text is not empty (the
        # leading-space rule above); otherwise keep the old start one more step.
        next_prefix = self._decode(self._read_offset, end)
        if next_prefix:
            del self._ids[:self._read_offset]
            end -= self._read_offset
            self._prefix_offset, self._prefix_text = 0, next_prefix
        else:
            self._prefix_text = text
        self._read_offset = end
        return delta

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end],
                                      skip_special_tokens=self._skip_special_tokens)
