"""Resolving EngineConfig's "auto" choices and sizing the KV pool."""

from __future__ import annotations

import logging

import torch

from engine.checkpoint.types import LlamaArchConfig, QuantConfig
from engine.config import ConfigError, EngineConfig
from engine.model.attention.base import AttentionBackend
from engine.model.attention.torch_ref import TorchAttentionBackend
from engine.model.linear.base import LinearBackend
from engine.model.linear.torch_ref import TorchLinearBackend
from engine.model.lora.base import LoraKernels, LoraModelConfig
from engine.model.lora.torch_ref import TorchLoraKernels

log = logging.getLogger(__name__)


def resolve_device(config: EngineConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda was asked for but no CUDA GPU is visible; "
                          "use --device cpu or run on a GPU machine")
    return torch.device(config.device)


def resolve_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    if config.dtype == "auto":
        # fp16 matmuls on the CPU are slow and inexact; GPTQ scales are fp16, so fp16 on GPUs.
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, config.dtype)


def make_linear_backend(config: EngineConfig, quant: QuantConfig, device: torch.device,
                        dtype: torch.dtype) -> LinearBackend:
    choice = config.linear_backend
    if choice == "auto":
        # On CUDA the tensor-core kernel for 4-bit layers (Triton where it cannot be built).
        choice = "mma" if device.type == "cuda" else "torch"
    if choice == "torch":
        return TorchLinearBackend(dtype, device)
    if device.type != "cuda":
        raise ConfigError(f"linear_backend={choice} needs a CUDA device")
    if choice == "exllama":
        from engine.model.linear.exllama import make_cuda_linear_backend

        return make_cuda_linear_backend(quant, dtype, device, config.dense_weights)
    if dtype != torch.float16:
        # The GPTQ kernels compute in fp16 (the checkpoints' scales are fp16).
        from engine.model.linear.fp16 import ExpandedLinearBackend

        log.info("linear_backend=triton computes in float16; %s expands every layer at load",
                 dtype)
        return ExpandedLinearBackend(dtype, device)
    from engine.model.linear.triton_backend import TritonLinearBackend

    return TritonLinearBackend(device, dense_weights=config.dense_weights,
                               use_mma=choice == "mma")


def make_lora_model_config(config: EngineConfig, linear: LinearBackend,
                           device: torch.device) -> LoraModelConfig | None:
    """Adapter slots for every projection when LoRA is on: the grouped Triton kernels on CUDA,
    the torch reference elsewhere."""
    lora = config.lora
    if lora is None:
        return None
    if not linear.supports_lora:
        raise ConfigError(f"the {linear.name} linear backend cannot serve LoRA adapters; "
                          "choose another --linear-backend")
    kernels: LoraKernels = TorchLoraKernels()
    if device.type == "cuda":
        from engine.model.lora.triton_sgmv import TritonLoraKernels

        # A fused q/k/v layer's shrink is the widest: three projections of max rank.
        kernels = TritonLoraKernels(config.max_num_batched_tokens, 3 * lora.max_lora_rank,
                                    device)
    return LoraModelConfig(lora.max_loras, lora.max_lora_rank, kernels)


def make_attention_backend(config: EngineConfig, device: torch.device) -> AttentionBackend:
    choice = config.attention_backend
    if choice == "auto":
        # On CUDA the tensor-core kernel for 4-bit layers (Triton where it cannot be built).
        choice = "mma" if device.type == "cuda" else "torch"
    if choice == "torch":
        return TorchAttentionBackend()
    if device.type != "cuda":
        raise ConfigError("attention_backend=triton needs a CUDA device")
    from engine.model.attention.cuda import CudaAttentionBackend

    return CudaAttentionBackend()


def num_kv_blocks(config: EngineConfig, arch: LlamaArchConfig, device: torch.device,
                  dtype: torch.dtype, max_model_len: int) -> int:
    """Blocks in the KV pool: explicit, else from the memory budget. The pool must hold at
    least one sequence of max_model_len tokens, or a long request could never run."""
    from engine.core.runner import kv_bytes_per_block

    per_block = kv_bytes_per_block(arch.num_layers, arch.num_kv_heads, arch.head_dim,
                                   config.block_size, dtype)
    if config.num_kv_blocks is not None:
        blocks = config.num_kv_blocks
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        # Leave room for activations and the largest step's temporaries, and for the step
        # graphs' own: their static buffers and about one layer's temporaries at their
        # largest size (engine/model/step_graphs.py), a few hidden-sized rows plus the
        # q/k/v and MLP outputs a token.
        graph_tokens = (min(config.cuda_graph_max_tokens, config.max_num_batched_tokens)
                        if config.cuda_graphs else 0)
        per_token = 12 * arch.hidden_size + 3 * arch.intermediate_size
        reserve = (1 << 30) + graph_tokens * per_token * torch.finfo(dtype).bits // 8
        budget = int(total * config.gpu_memory_utilization) - (total - free) - reserve
        blocks = max(0, budget // per_block)
    else:
        blocks = int(config.kv_cache_memory_gb * (1 << 30)) // per_block
    needed = -(-max_model_len // config.block_size)
    if blocks < needed:
        raise ConfigError(
            f"the KV cache holds {blocks} blocks of {config.block_size} tokens, fewer than one "
            f"sequence of max_model_len={max_model_len} needs ({needed}); lower max_model_len "
            f"or give the cache more memory")
    log.info("KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB)", blocks,
             config.block_size, blocks * config.block_size, blocks * per_block / (1 << 30))
    return blocks
