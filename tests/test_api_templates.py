"""Chat templates: the model card's default, Llama-2-chat and sandboxed Jinja, exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.templates import (
    ChatMessage,
    DefaultTemplate,
    JinjaTemplate,
    Llama2ChatTemplate,
    TemplateError,
    load_template,
)


def msgs(*pairs: tuple[str, str]) -> list[ChatMessage]:
    return [ChatMessage(role, content) for role, content in pairs]


def test_default_template_is_the_model_cards() -> None:
    rendered = DefaultTemplate().render(msgs(("system", "You are helpful."),
                                             ("user", "What is 2+2?")))
    assert rendered.text == ("### System:\nYou are helpful.\n\n### User:\nWhat is 2+2?\n\n"
                             "### Response:")
    assert rendered.stop == ("### User:",) and rendered.add_special_tokens


def test_default_template_without_a_system_message_and_multi_turn() -> None:
    assert DefaultTemplate().render(msgs(("user", "Hi"))).text == \
        "### User:\nHi\n\n### Response:"
    rendered = DefaultTemplate().render(msgs(
        ("system", "S"), ("user", "U1"), ("assistant", "A1"), ("user", "U2")))
    assert rendered.text == ("### System:\nS\n\n### User:\nU1\n\n### Response:\nA1\n\n"
                             "### User:\nU2\n\n### Response:")


def test_llama_2_chat_template() -> None:
    t = Llama2ChatTemplate()
    one = t.render(msgs(("system", "Be brief."), ("user", "Hi")))
    assert one.text == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]"
    assert not one.add_special_tokens and one.stop == ()
    multi = t.render(msgs(("user", "U1"), ("assistant", "A1"), ("user", "U2")))
    assert multi.text == "<s>[INST] U1 [/INST] A1 </s><s>[INST] U2 [/INST]"


def test_jinja_template_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "chat.jinja"
    path.write_text("{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}\n"
                    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    rendered = load_template(str(path), None).render(msgs(("system", "S"), ("user", "U")))
    assert rendered.text == "<s><system>S\n<user>U\n<assistant>"
    assert not rendered.add_special_tokens, "the template wrote BOS itself"


def test_jinja_templates_run_sandboxed_and_report_their_errors() -> None:
    escape = JinjaTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}", "evil")
    with pytest.raises(TemplateError):
        escape.render(msgs(("user", "x")))
    strict = JinjaTemplate("{% if messages[0].role != 'user' %}"
                           "{{ raise_exception('must start with user') }}{% endif %}", "strict")
    with pytest.raises(TemplateError, match="must start with user"):
        strict.render(msgs(("system", "x")))
    with pytest.raises(TemplateError, match="does not parse"):
        JinjaTemplate("{% for %}", "broken")


def test_load_template_names() -> None:
    assert isinstance(load_template("default", None), DefaultTemplate)
    assert isinstance(load_template("alpaca-system", None), DefaultTemplate)
    assert isinstance(load_template("llama-2-chat", None), Llama2ChatTemplate)
    assert isinstance(load_template("tokenizer", "{{ messages[0].content }}"), JinjaTemplate)
    with pytest.raises(TemplateError, match="no chat_template"):
        load_template("tokenizer", None)
    with pytest.raises(TemplateError, match="none of these"):
        load_template("chatml-ish", None)
