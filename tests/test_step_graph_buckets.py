"""Which step sizes the step graphs capture (engine/model/step_graphs.py), and the setting that
bounds them; the graphs themselves run on the GPU (tests/test_cuda_step_graphs.py)."""

from __future__ import annotations

import pytest

from engine.config import ConfigError, EngineConfig
from engine.model.step_graphs import token_buckets


def test_buckets_double_to_128_then_step_by_64_up_to_the_bound() -> None:
    assert token_buckets(512) == [16, 32, 64, 128, 192, 256, 320, 384, 448, 512]
    assert token_buckets(300) == [16, 32, 64, 128, 192, 256, 300]
    assert token_buckets(100) == [16, 32, 64, 100]
    assert token_buckets(16) == [16]
    assert token_buckets(5) == [16]  # the smallest bucket holds every smaller step
    assert token_buckets(0) == []


def test_buckets_pad_a_step_by_less_than_half_and_at_most_64_tokens_above_128() -> None:
    buckets = token_buckets(1024)
    for tokens in range(1, 1025):
        bucket = min(b for b in buckets if b >= tokens)
        assert bucket - tokens < max(tokens, 16)
        if tokens > 128:
            assert bucket - tokens < 64


def test_a_negative_bound_is_refused() -> None:
    with pytest.raises(ConfigError, match="cuda_graph_max_tokens"):
        EngineConfig(model="/m", cuda_graph_max_tokens=-1)
