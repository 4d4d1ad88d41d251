"""Engine TokenLogprobs -> OpenAI's two logprob shapes (legacy completions, chat)."""

from __future__ import annotations

from collections.abc import Sequence

from app.protocol.chat import TokenLogprobOut, TopLogprob
from app.protocol.completions import CompletionLogprobs
from engine.client import TokenizerLike
from engine.outputs import TokenLogprob


class CompletionLogprobBuilder:
    """Accumulates the legacy {tokens, token_logprobs, top_logprobs, text_offset} shape;
    text_offset counts characters from the start of the choice's full text (prompt included,
    as OpenAI does)."""

    def __init__(self, tokenizer: TokenizerLike, start_offset: int) -> None:
        self.tokenizer = tokenizer
        self.offset = start_offset

    def build(self, entries: Sequence[TokenLogprob]) -> CompletionLogprobs:
        tok = self.tokenizer
        strings = tok.token_strings([e.token_id for e in entries])
        out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for entry, text in zip(entries, strings, strict=True):
            out.tokens.append(text)
            out.token_logprobs.append(entry.logprob)
            top_strings = tok.token_strings([t for t, _ in entry.top])
            out.top_logprobs.append({s: lp for s, (_, lp) in zip(top_strings, entry.top,
                                                                  strict=True)})
            out.text_offset.append(self.offset)
            self.offset += len(text)
        return out


def prompt_entries(tokenizer: TokenizerLike, prompt_ids: Sequence[int],
                   entries: Sequence[TokenLogprob | None] | None) -> list[TokenLogprob]:
    """The echoed prompt's logprobs. BOS is not part of the echoed text and the first token has
    no logprob (nothing precedes it); both are left out, so every entry is a number."""
    if not entries:
        return []
    bos = tokenizer.bos_token_id
    return [e for t, e in zip(prompt_ids, entries, strict=True) if e is not None and t != bos]


def chat_entries(tokenizer: TokenizerLike, entries: Sequence[TokenLogprob]
                 ) -> list[TokenLogprobOut]:
    out = []
    for entry in entries:
        top = [TopLogprob(token=s, logprob=lp, bytes=list(tokenizer.token_bytes(t)))
               for (t, lp), s in zip(entry.top, tokenizer.token_strings([t for t, _ in entry.top]),
                                     strict=True)]
        out.append(TokenLogprobOut(token=tokenizer.token_strings([entry.token_id])[0],
                                   logprob=entry.logprob,
                                   bytes=list(tokenizer.token_bytes(entry.token_id)),
                                   top_logprobs=top))
    return out
