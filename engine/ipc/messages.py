"""What the HTTP front and the engine core process say to each other. Torch-free.

Front -> core: one ``Commands`` message per batch of front work (requests to add, requests to
abort, shutdown), sent when the event loop has gathered them. Core -> front: one ``StepOutputs``
per engine step that produced anything (and at least one a second while idle, as a sign of
life), carrying every request's new token ids, then ``CoreStopped`` once on shutdown.

Everything is a msgspec Struct (or a dataclass msgspec knows, such as SamplingParams) encoded
as MessagePack; Structs are ``array_like`` (fields by position, not by name), so a step's
message for 64 streams is a few hundred bytes. The start-up reports (``CoreStarting``,
``CoreReady``, ``CoreFailed``) travel once, over the process's start-up pipe.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import msgspec

from engine.lora.registry import LoraAdapterInfo
from engine.lora.spec import LoraSpec
from engine.outputs import EngineStats, ModelInfo, TokenLogprob
from engine.params import SamplingParams


class CoreFinish(enum.StrEnum):
    """Why the core ended a request. The front turns this into a FinishReason; EOS and
    STOP_TOKEN also tell it that the last token adds no text."""

    EOS = "eos"
    STOP_TOKEN = "stop_token"  # one of the request's stop_token_ids
    LENGTH = "length"  # max_tokens or the model's context length
    GRAMMAR_COMPLETE = "grammar_complete"  # the constraint's grammar accepts nothing more
    ABORT = "abort"  # the core shut down
    ERROR = "error"  # a fault in the core; see RequestOutput.error


class RequestOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """One request's part of a step: the tokens the step accepted for it, in order."""

    request_id: str
    token_ids: list[int]
    # One entry per token of token_ids when the request asked for logprobs.
    logprobs: list[TokenLogprob] | None = None
    # Once, with the request's first output, when it asked for prompt logprobs; entry 0
    # (the first prompt token) is None.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish: CoreFinish | None = None
    error: str | None = None
    # Prompt tokens found in the prefix cache at first admission.
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    # time.monotonic() when first scheduled (one clock for every process of the machine).
    first_scheduled: float | None = None


class RefusalKind(enum.StrEnum):
    PROMPT = "prompt"  # a prompt the front should have refused itself
    GRAMMAR = "grammar"  # the constraint's grammar did not compile (in time)
    LORA = "lora"  # the adapter asked for is not loaded


class Refusal(msgspec.Struct, array_like=True):
    """An add the core refused; the front raises it to the request's caller."""

    request_id: str
    kind: RefusalKind
    message: str
    param: str
    code: str | None


class AddRequest(msgspec.Struct, array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float  # time.monotonic() when the front received it
    lora: str | None = None  # the adapter to run with (None: the base model)


class LoadLora(msgspec.Struct, array_like=True):
    call_id: int  # answered by the LoraResult of the same id
    spec: LoraSpec
    replace: bool = False


class UnloadLora(msgspec.Struct, array_like=True):
    call_id: int
    name: str


class Commands(msgspec.Struct, array_like=True, tag="commands"):
    adds: list[AddRequest] = []
    aborts: list[str] = []
    loads: list[LoadLora] = []
    unloads: list[UnloadLora] = []
    shutdown: bool = False


class LoraResult(msgspec.Struct, array_like=True):
    """The answer to a LoadLora or UnloadLora: the loaded adapter's description, or the
    LoraError (message and code), and every adapter served after it."""

    call_id: int
    info: LoraAdapterInfo | None
    error: str | None
    code: str | None
    adapters: list[LoraAdapterInfo]


class StepOutputs(msgspec.Struct, array_like=True, tag="step"):
    outputs: list[RequestOutput]
    stats: EngineStats
    refused: list[Refusal] = []
    lora_results: list[LoraResult] = []


class CoreStopped(msgspec.Struct, array_like=True, tag="stopped"):
    """The core's last message: every request it held has been ended in earlier outputs."""


# ---- start-up reports (pickled over the process's start-up pipe) -------------------------


@dataclass(frozen=True)
class CoreStarting:
    """The checkpoint is on disk (downloaded if need be); the weights load next."""

    checkpoint_path: str


@dataclass(frozen=True)
class CoreReady:
    model_info: ModelInfo
    warmup_s: float
    adapters: tuple[LoraAdapterInfo, ...] = ()  # loaded at start-up (--lora-modules)


@dataclass(frozen=True)
class CoreFailed:
    error: str


CoreMessage = StepOutputs | CoreStopped


class Codec:
    """The encoder and decoders of one side, made once (msgspec caches per-type plans)."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._commands = msgspec.msgpack.Decoder(Commands)
        self._core = msgspec.msgpack.Decoder(CoreMessage)

    def encode(self, message: Commands | StepOutputs | CoreStopped) -> bytes:
        return self._encoder.encode(message)

    def decode_commands(self, data: bytes | memoryview) -> Commands:
        return self._commands.decode(data)

    def decode_core(self, data: bytes | memoryview) -> StepOutputs | CoreStopped:
        return self._core.decode(data)
