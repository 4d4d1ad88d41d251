"""Batched per-request sampling and logprobs."""

from engine.sampling.sampler import Sampler, SamplerOutput, SamplingRow

__all__ = ["Sampler", "SamplerOutput", "SamplingRow"]
