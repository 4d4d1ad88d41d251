"""What the engine hands back to its callers. Torch-free: the HTTP layer consumes these."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import msgspec


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context length
    ABORT = "abort"  # the caller aborted the request (client gone)
    ERROR = "error"  # an internal fault ended it; see GenerationDelta.error


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    """The logprob of one sampled (or prompt) token and its top alternatives. A Struct: it
    crosses from the engine core process to the front as it is (engine/ipc/messages.py)."""

    token_id: int
    logprob: float
    # The most likely tokens at this position, best first: (token_id, logprob).
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class RequestTimings:
    """Wall-clock seconds (time.monotonic) of a request's milestones, for metrics."""

    arrival: float
    first_scheduled: float | None
    first_token: float | None
    finished: float | None
    # The step that produced the last token (differs from ``finished`` for an abort).
    last_token: float | None = None


@dataclass(frozen=True)
class GenerationDelta:
    """One increment of a request's output.

    Concatenating ``text`` over all deltas gives exactly the final text (stop strings removed);
    ``token_ids`` concatenated are all generated tokens (including the one that completed a stop
    string or was a stop token, so usage counts are exact). ``finish_reason`` is set on the last
    delta only, and no delta follows it.
    """

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    # One entry per token in ``token_ids`` when logprobs were asked for, else None.
    logprobs: tuple[TokenLogprob, ...] | None
    num_prompt_tokens: int
    num_output_tokens: int  # cumulative, including this delta
    # Prompt tokens whose K/V came from the prefix cache instead of being computed (fixed from
    # the first token on; 0 for requests that asked for prompt logprobs or never ran).
    num_cached_tokens: int = 0
    finish_reason: FinishReason | None = None
    # Which stop string or stop token id ended the request, when one did.
    stop_reason: str | int | None = None
    # Set only on the first delta when prompt_logprobs was asked for; entry 0 is None.
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    # Set only on the last delta.
    timings: RequestTimings | None = None
    num_preemptions: int = 0
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class EngineStats(msgspec.Struct, frozen=True, array_like=True):
    """A snapshot of the engine for health checks and metrics. Counters are totals since start.
    A Struct: the engine core process sends one with every step's outputs."""

    num_running: int
    num_waiting: int
    num_kv_blocks_total: int
    # Held by no request: free blocks hold nothing, cached ones a reusable prefix (evicted
    # least recently used first when a new block is needed). Both are available to new work;
    # total - free - cached are in use.
    num_kv_blocks_free: int
    num_kv_blocks_cached: int
    num_preemptions_total: int
    num_prompt_tokens_total: int
    num_generation_tokens_total: int
    num_steps_total: int
    # vLLM's prefix_cache_queries / prefix_cache_hits: prompt tokens looked up in the prefix
    # cache at first admission, and how many of them were found there.
    num_prefix_cache_queries_total: int
    num_prefix_cache_hits_total: int
    loop_alive: bool
    # LoRA adapters of the running and of the waiting requests (vLLM's lora_requests_info).
    running_lora_adapters: tuple[str, ...] = ()
    waiting_lora_adapters: tuple[str, ...] = ()

    @property
    def num_kv_blocks_available(self) -> int:
        return self.num_kv_blocks_free + self.num_kv_blocks_cached

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of blocks held by running requests (cached idle blocks are not usage)."""
        used = self.num_kv_blocks_total - self.num_kv_blocks_available
        return used / self.num_kv_blocks_total if self.num_kv_blocks_total else 0.0


@dataclass(frozen=True)
class ModelInfo:
    """What was loaded, for /v1/models and the model-info metric."""

    model: str  # the repo id or local path given by the user
    revision: str | None
    bits: int
    group_size: int | None  # None: one group over the whole input (-1 in quantize_config)
    act_order: bool
    linear_backend: str  # e.g. "torch", "exllama", "fp16-expanded"
    attention_backend: str
    max_model_len: int
    vocab_size: int
    device: str
    # A checkpoint written by `gptq-serve synth`: random weights, so its text is gibberish.
    random_weights: bool = False
    # LoRA: adapters resident on the device at once and the largest rank (0: LoRA off).
    max_loras: int = 0
    max_lora_rank: int = 0
