"""Quantised-linear backends. Each takes GPTQLinearWeights and computes x @ W^T."""
