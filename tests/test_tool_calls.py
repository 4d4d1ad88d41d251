"""The tool-call parser under every chunking of its input, and the templates' rendering of
tools, earlier calls and tool results."""

from __future__ import annotations

import random

import pytest

from app.templates import (
    ChatMessage,
    DefaultTemplate,
    JinjaTemplate,
    Llama2ChatTemplate,
    ToolCallMessage,
    ToolPrompt,
)
from app.tool_calls import CallArguments, CallStart, Content, ToolCallStream, split_tool_calls

NAMES = frozenset({"get_weather", "noop"})
FORCED = ('<tool_call>{"name": "get_weather", "arguments": {"city": "a}\\"{[", "n": [1, {"x": '
          '"]"}]}}</tool_call>\n<tool_call>{"name": "noop", "arguments": {}}</tool_call>')
EXPECTED = [("get_weather", '{"city": "a}\\"{[", "n": [1, {"x": "]"}]}'), ("noop", "{}")]


def chunked(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(text):
        j = i + rng.randint(1, 9)
        out.append(text[i:j])
        i = j
    return out


@pytest.mark.parametrize("forced", [True, False])
def test_any_chunking_gives_the_same_calls_and_fragments(forced: bool) -> None:
    for seed in range(100):
        stream = ToolCallStream(NAMES, forced)
        events = [e for piece in chunked(FORCED, seed) for e in stream.feed(piece)]
        events += stream.finish()
        assert [(c.name, c.arguments) for c in stream.calls] == EXPECTED
        starts = [e for e in events if isinstance(e, CallStart)]
        assert [s.name for s in starts] == ["get_weather", "noop"]
        for start, (_, arguments) in zip(starts, EXPECTED, strict=True):
            assert "".join(e.text for e in events if isinstance(e, CallArguments)
                           and e.index == start.index) == arguments
        assert "".join(e.text for e in events if isinstance(e, Content)).strip() == ""


def test_forced_arguments_stream_before_the_call_closes() -> None:
    stream = ToolCallStream(NAMES, forced=True)
    assert stream.feed('<tool_call>{"name": "get_weather", "arg') == []
    start, fragment = stream.feed('uments": {"ci')
    assert isinstance(start, CallStart) and start.name == "get_weather"
    assert fragment == CallArguments(0, '{"ci')
    assert stream.feed('ty": "x"') == [CallArguments(0, 'ty": "x"')]
    assert stream.feed("}}</tool") == [CallArguments(0, "}")]
    assert stream.feed("_call>") == [] and stream.calls[0].arguments == '{"city": "x"}'


def test_auto_keeps_text_and_refuses_bad_blocks() -> None:
    text = ('Sure. <tool_call>{"name": "unknown", "arguments": {}}</tool_call> then '
            '<tool_call>{"name": "noop", "arguments": "{\\"a\\": 1}"}</tool_call> and <tool_ca')
    for seed in range(50):
        stream = ToolCallStream(NAMES, forced=False)
        events = [e for piece in chunked(text, seed) for e in stream.feed(piece)]
        events += stream.finish()
        content = "".join(e.text for e in events if isinstance(e, Content))
        assert content == ('Sure. <tool_call>{"name": "unknown", "arguments": {}}</tool_call> '
                           'then  and <tool_ca')
        assert [(c.name, c.arguments) for c in stream.calls] == [("noop", '{"a": 1}')]
    content, calls = split_tool_calls("<tool_call>{broken", NAMES, forced=False)
    assert content == "<tool_call>{broken" and calls == []


HISTORY = [ChatMessage("system", "Be brief."), ChatMessage("user", "Weather?"),
           ChatMessage("assistant", "", tool_calls=(
               ToolCallMessage("c1", "get_weather", '{"city": "Oslo"}'),
               ToolCallMessage("c2", "noop", "not json"))),
           ChatMessage("tool", "-3", tool_call_id="c1", name="get_weather"),
           ChatMessage("tool", "ok", tool_call_id="c2", name="noop")]
PROMPT = ToolPrompt("TOOLS HERE", [{"type": "function", "function": {"name": "get_weather"}}])


def test_built_in_templates_render_tools_calls_and_results() -> None:
    default = DefaultTemplate().render(HISTORY, PROMPT).text
    assert default == (
        "### System:\nBe brief.\n\nTOOLS HERE\n\n### User:\nWeather?\n\n### Response:\n"
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
        '<tool_call>{"name": "noop", "arguments": "not json"}</tool_call>\n\n### User:\n'
        '<tool_result name="get_weather">\n-3\n</tool_result>\n<tool_result name="noop">\nok\n'
        "</tool_result>\n\n### Response:")
    llama = Llama2ChatTemplate().render(HISTORY, PROMPT).text
    assert llama.startswith("<s>[INST] <<SYS>>\nBe brief.\n\nTOOLS HERE\n<</SYS>>\n\nWeather? "
                            "[/INST] <tool_call>")
    assert llama.endswith('<tool_result name="noop">\nok\n</tool_result> [/INST]')


def test_jinja_templates_get_tools_when_they_read_them() -> None:
    reads = JinjaTemplate("{{ tools | length }}|{% for m in messages %}{{ m.role }}:"
                          "{{ m.tool_calls[0].function.arguments.city if m.tool_calls else "
                          "m.get('name', '') }};{% endfor %}", "t")
    assert reads.render(HISTORY, PROMPT).text == \
        "1|system:;user:;assistant:Oslo;tool:get_weather;tool:noop;"
    plain = JinjaTemplate("{% for m in messages %}{{ m.role }}={{ m.content }}|{% endfor %}", "p")
    text = plain.render(HISTORY, PROMPT).text
    assert text.startswith("system=Be brief.\n\nTOOLS HERE|user=Weather?|assistant=<tool_call>")
    assert "user=<tool_result" in text and "tool=" not in text
