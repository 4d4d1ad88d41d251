"""The inference engine: GPTQ checkpoint loading, paged KV cache, continuous batching, sampling.

Importing this package (and its ``params``, ``outputs``, ``config`` and ``client`` modules) does
not import torch: the HTTP layer depends only on those torch-free contracts.
"""
