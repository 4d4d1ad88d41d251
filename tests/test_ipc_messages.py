"""The messages between the front and the engine core: typed both ways, checked on decoding."""

from __future__ import annotations

import msgspec
import pytest

from engine.ipc.messages import AddRequest, Codec, Commands, CoreFinish, RequestOutput, StepOutputs
from engine.outputs import EngineStats, TokenLogprob
from engine.params import SamplingParams


def test_messages_round_trip_typed() -> None:
    codec = Codec()
    params = SamplingParams(max_tokens=5, logit_bias={5: 2.0}, stop=("x",), seed=-3)
    commands = Commands(adds=[AddRequest("a", [1, 2], params, 1.5)], aborts=["b"])
    assert codec.decode_commands(codec.encode(commands)) == commands
    out = StepOutputs([RequestOutput("a", [7], [TokenLogprob(7, -0.5, ((7, -0.5),))],
                                     finish=CoreFinish.EOS)],
                      EngineStats(1, 0, 10, 9, 0, 0, 2, 1, 1, 0, 0, True))
    assert codec.decode_core(codec.encode(out)) == out
    # Decoding checks types and SamplingParams' own rules: a bad message never becomes one.
    bad = msgspec.msgpack.encode(["commands", [["a", [1], {"max_tokens": 0}, 0.0]], [], False])
    with pytest.raises(msgspec.ValidationError, match="max_tokens must be at least 1"):
        codec.decode_commands(bad)
    with pytest.raises(msgspec.ValidationError):
        codec.decode_commands(msgspec.msgpack.encode(["commands", [["a", "1"]], [], False]))
