"""The interface the HTTP layer uses to talk to an engine. Torch-free.

``app`` depends on this Protocol only; the real implementation is
``engine.frontend.client.EngineProcessClient`` (the engine core in its own process) and tests
may hand the app any object that satisfies it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from engine.lora.registry import LoraAdapterInfo
from engine.lora.spec import LoraSpec
from engine.outputs import EngineStats, GenerationDelta, ModelInfo
from engine.params import SamplingParams


class EngineDeadError(RuntimeError):
    """``generate()`` was called after the engine stopped for good (its process died or hung,
    or the server is shutting down): nothing will run until the server is restarted."""


class RequestRefused(ValueError):
    """The engine refused a request it had accepted for checking (e.g. a grammar that did not
    compile in time). ``param`` names the request field, as the OpenAI API spells it."""

    def __init__(self, message: str, param: str, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class TokenizerLike(Protocol):
    """The tokenizer facade the app needs (prompt building, /tokenize, logprob token strings)."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_token_id(self) -> int: ...

    @property
    def bos_token_id(self) -> int | None: ...

    @property
    def chat_template(self) -> str | None:
        """The Jinja template from tokenizer_config.json, if the checkpoint ships one."""
        ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        """Each token's own text as it reads in the output (sentencepiece '▁' as a space; a
        byte-fallback token that is not a whole character as its bytes' escape ``bytes:\\xNN``,
        the way OpenAI spells it)."""
        ...

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes this token contributes to the text."""
        ...


class EngineClient(Protocol):
    @property
    def model_info(self) -> ModelInfo: ...

    @property
    def tokenizer(self) -> TokenizerLike: ...

    def generate(self, prompt_token_ids: Sequence[int], params: SamplingParams,
                 request_id: str, lora: str | None = None) -> AsyncIterator[GenerationDelta]:
        """Queue a request and yield its output increments; the last one has finish_reason.
        ``lora`` names a loaded adapter to run with (None: the base model).

        Raises ``ValueError`` at once (before yielding) for a prompt the engine cannot take
        (empty, token ids outside the vocabulary, longer than max_model_len - 1), and
        ``LoraError`` (a ValueError, code "lora_not_found") for an adapter that is not loaded.
        Closing the iterator early aborts the request.
        """
        ...

    def lora_adapters(self) -> tuple[LoraAdapterInfo, ...]:
        """The adapters served now (a snapshot)."""
        ...

    async def load_lora(self, spec: LoraSpec, replace: bool = False) -> LoraAdapterInfo:
        """Load and serve an adapter; raises LoraError (bad adapter, name taken, LoRA off) or
        EngineDeadError (the engine has stopped)."""
        ...

    async def unload_lora(self, name: str) -> None:
        """Stop serving an adapter (running requests finish with it); LoraError if unknown,
        EngineDeadError if the engine has stopped."""
        ...

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks. Unknown or finished ids are ignored."""
        ...

    def stats(self) -> EngineStats: ...

    async def start(self) -> None:
        """Start the engine loop (after the model is loaded)."""
        ...

    async def shutdown(self) -> None:
        """Stop the loop; requests still running finish with FinishReason.ABORT."""
        ...
