"""Benchmarks: `gptq-serve bench` (engine, server, kernels) and synthetic layers for GPU tests."""
