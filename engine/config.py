"""Engine settings: one frozen dataclass, validated on construction.

The HTTP layer's settings object builds this; nothing else in the engine reads flags or env vars.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.lora.spec import LoraConfig


class ConfigError(ValueError):
    """A setting is invalid; the message says which and what to do."""


@dataclass(frozen=True)
class EngineConfig:
    model: str = "TheBloke/Llama-2-13B-GPTQ"
    revision: str | None = "main"
    # Where downloaded checkpoints live (None: huggingface_hub's default cache).
    download_dir: str | None = None
    # Never touch the network: load only what is already on disk.
    offline: bool = False
    # None: the checkpoint's max_position_embeddings.
    max_model_len: int | None = None
    max_num_seqs: int = 64
    # Token budget of one step (prefill chunks plus decode tokens).
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    # Explicit KV pool size in blocks; None sizes it from memory (gpu_memory_utilization on a
    # GPU, kv_cache_memory_gb on the CPU).
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.90
    kv_cache_memory_gb: float = 1.0
    # "auto" picks "cuda" when a GPU is present, else "cpu".
    device: str = "auto"
    # "auto" picks "mma" on CUDA (4-bit layers on the w4a16 tensor-core kernel; 8-bit layers,
    # or every layer where that kernel cannot be built, as "triton": the Triton GPTQ kernels
    # with exllamav2's 4-bit kernel for the step sizes where it measures faster), else "torch".
    linear_backend: str = "auto"
    # Keep a dense fp16 copy of every quantised layer for large steps (prefill): faster first
    # tokens for 4x (4-bit) or 2x (8-bit) the weights' memory, taken from the KV cache.
    dense_weights: bool = False
    # "auto" picks "triton" on CUDA, else "torch".
    attention_backend: str = "auto"
    # "auto": float16 on CUDA, float32 on the CPU (fp16 matmuls on CPU are slow and inexact).
    dtype: str = "auto"
    # Capture decode steps in CUDA graphs (ignored on the CPU).
    cuda_graphs: bool = True
    # With cuda_graphs, the other steps (prompts, prefill chunks, mixed batches) of up to this
    # many tokens run as CUDA graphs between their attention calls (engine/model/step_graphs.py);
    # 0: they run eagerly. Capped at max_num_batched_tokens.
    cuda_graph_max_tokens: int = 512
    # Keep full KV blocks after their request ends and share them with later requests whose
    # prompts start with the same tokens (automatic prefix caching).
    enable_prefix_caching: bool = True
    # Schedule and build each step while the previous one runs on the device, its sampled ids
    # staying there (engine/core/llm_engine.py). Off: each step is resolved before the next.
    overlap_steps: bool = True
    seed: int = 0
    # Seconds a constrained request's grammar may take to compile before it is refused.
    grammar_compile_timeout: float = 10.0
    # Compiled grammars kept for reuse, keyed by (kind, text).
    grammar_cache_size: int = 256
    # LoRA adapters on the base (None: off; no adapter slots are allocated).
    lora: LoraConfig | None = None

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model must name a hub repo id or a local checkpoint folder")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"max_num_seqs ({self.max_num_seqs}) so every running sequence can decode")
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ConfigError(f"block_size must be one of 8, 16, 32, 64, 128, got {self.block_size}")
        if self.cuda_graph_max_tokens < 0:
            raise ConfigError("cuda_graph_max_tokens must be 0 (off) or positive, got "
                              f"{self.cuda_graph_max_tokens}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if not 0.05 <= self.gpu_memory_utilization <= 0.99:
            raise ConfigError("gpu_memory_utilization must be between 0.05 and 0.99, got "
                              f"{self.gpu_memory_utilization}")
        if self.kv_cache_memory_gb <= 0:
            raise ConfigError(f"kv_cache_memory_gb must be positive, got {self.kv_cache_memory_gb}")
        if self.grammar_compile_timeout <= 0:
            raise ConfigError("grammar_compile_timeout must be positive, got "
                              f"{self.grammar_compile_timeout}")
        if self.grammar_cache_size < 1:
            raise ConfigError(f"grammar_cache_size must be positive, got {self.grammar_cache_size}")
        _one_of("device", self.device, ("auto", "cpu", "cuda"))
        _one_of("linear_backend", self.linear_backend, ("auto", "torch", "triton", "mma",
                                                              "exllama"))
        _one_of("attention_backend", self.attention_backend, ("auto", "torch", "triton"))
        _one_of("dtype", self.dtype, ("auto", "float16", "bfloat16", "float32"))


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
