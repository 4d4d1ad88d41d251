"""Engine TokenLogprobs -> OpenAI's two logprob shapes (legacy completions, chat)."""

from __future__ import annotations

from collections.abc import Sequence

from app.protocol.chat import TokenLogprobOut, TopLogprob
from app.protocol.completions import CompletionLogprobs
from engine.client import TokenizerLike
from engine.outputs import TokenLogprob


class CompletionLogprobBuilder:
    """Builds the legacy {tokens, token_logprobs, top_logprobs, text_offset} shape of generated
    tokens, delta by delta; text_offset counts characters from the start of the prompt (as
    OpenAI does, echoed or not), so the first generated token sits at len(prompt text)."""

    def __init__(self, tokenizer: TokenizerLike, start_offset: int,
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.offset = start_offset
        self.skip_special_tokens = skip_special_tokens

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
            if not (self.skip_special_tokens and skipped_special(tok, entry.token_id)):
                self.offset += len(text)
        return out


def skipped_special(tokenizer: TokenizerLike, token_id: int) -> bool:
    """Whether the token is a special one that decoding with skip_special_tokens leaves out of
    the text: it keeps its name in ``tokens`` but adds no characters, so the offsets after it
    stay on the text."""
    return (tokenizer.decode([token_id], skip_special_tokens=True) == ""
            and tokenizer.decode([token_id], skip_special_tokens=False) != "")


def echo_logprobs(tokenizer: TokenizerLike, prompt_ids: Sequence[int],
                  entries: Sequence[TokenLogprob | None] | None,
                  echo_text: str) -> CompletionLogprobs:
    """The echoed prompt's logprobs, with text offsets into ``echo_text``.

    Tokens without a logprob (BOS; the first token of a prompt given without BOS) are left out,
    so every entry is a number as the schema requires. The decoded prompt drops the space that
    sentencepiece writes before the first word ('▁Hello' reads "Hello"), so the first token's
    string drops it too and the offsets line up with the echoed text.
    """
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    if not entries:
        return out
    bos = tokenizer.bos_token_id
    pairs = [(t, e) for t, e in zip(prompt_ids, entries, strict=True) if t != bos]
    strings = tokenizer.token_strings([t for t, _ in pairs])
    if strings and strings[0].startswith(" ") and not echo_text.startswith(" "):
        strings[0] = strings[0][1:]
    offset = 0
    for (token_id, entry), text in zip(pairs, strings, strict=True):
        if entry is not None:
            out.tokens.append(text)
            out.token_logprobs.append(entry.logprob)
            top_strings = tokenizer.token_strings([t for t, _ in entry.top])
            out.top_logprobs.append({s: lp for s, (_, lp) in zip(top_strings, entry.top,
                                                                  strict=True)})
            out.text_offset.append(offset)
        if not skipped_special(tokenizer, token_id):  # the echoed text skips them
            offset += len(text)
    return out


def concat(parts: Sequence[CompletionLogprobs | None]) -> CompletionLogprobs:
    out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for part in parts:
        if part is not None:
            out.tokens += part.tokens
            out.token_logprobs += part.token_logprobs
            out.top_logprobs += part.top_logprobs
            out.text_offset += part.text_offset
    return out


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
