"""--chat-template end to end: each way of choosing a chat format (the Llama-2-chat name, a Jinja
file given through the environment, the checkpoint's own tokenizer_config.json template)
decides the exact prompt tokens of /tokenize and /v1/chat/completions; a template that refuses
a conversation is a 400 on every route that renders it; a template that cannot be loaded stops
the server at start-up. Servers run over the fake engine (tests/fake_engine.py) with the real
tokenizer of the tiny checkpoint, all started at once."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fake_engine import ServerProcess
from tests.schemas.validate import validate
from tests.server import post_ok, serving, stop_all

MODEL = "tiny"
BOS, EOS = 1, 2
CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "developer", "content": "Answer in French."},
                {"role": "user", "content": "Bye"}]
# A Jinja chat template in the Hugging Face style, refusing conversations that open with the
# assistant. Roles arrive mapped ("developer" is a system message).
FILE_TEMPLATE = ("{% if messages[0].role == 'assistant' %}"
                 "{{ raise_exception('a conversation cannot open with the assistant') }}"
                 "{% endif %}{{ bos_token }}"
                 "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>\n"
                 "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
TOKENIZER_TEMPLATE = ("{% for m in messages %}|{{ m.role }}| {{ m.content }}\n{% endfor %}"
                      "|assistant|")


@dataclass(frozen=True)
class Servers:
    llama: ServerProcess
    jinja_file: ServerProcess
    tokenizer: ServerProcess


def with_chat_template(checkpoint: Path, folder: Path, template: str) -> Path:
    """A copy of ``checkpoint`` whose tokenizer_config.json carries ``template``."""
    copy = folder / "with-template"
    shutil.copytree(checkpoint, copy)
    config_path = copy / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = template
    config_path.write_text(json.dumps(config))
    return copy


@pytest.fixture(scope="module")
def servers(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Servers]:
    folder = tmp_path_factory.mktemp("chat")
    template_file = folder / "chat.jinja"
    template_file.write_text(FILE_TEMPLATE)
    name = ("--served-model-name", MODEL)
    found = Servers(
        llama=ServerProcess.fake(tiny_checkpoint, folder / "llama.log", *name,
                                 "--chat-template", "llama-2-chat"),
        jinja_file=ServerProcess.fake(tiny_checkpoint, folder / "jinja.log", *name,
                                      env={"GPTQ_CHAT_TEMPLATE": str(template_file)}),
        tokenizer=ServerProcess.fake(
            with_chat_template(tiny_checkpoint, folder, TOKENIZER_TEMPLATE),
            folder / "tokenizer.log", *name, "--chat-template", "tokenizer"))
    with serving(found.llama, found.jinja_file, found.tokenizer):
        yield found


def tokens(server: ServerProcess, **body: Any) -> list[int]:
    return post_ok(server, "/tokenize", body)["tokens"]


def assert_prompt_is(server: ServerProcess, text: str, add_special_tokens: bool) -> list[int]:
    """The conversation renders to ``text``: /tokenize of the messages equals /tokenize of the
    text, and a chat completion is charged exactly those prompt tokens."""
    expected = tokens(server, prompt=text, add_special_tokens=add_special_tokens)
    assert tokens(server, messages=CONVERSATION) == expected
    reply = post_ok(server, "/v1/chat/completions", {"model": MODEL, "messages": CONVERSATION,
                                                     "max_tokens": 2})
    assert reply["usage"]["prompt_tokens"] == len(expected)
    assert post_ok(server, "/detokenize", {"tokens": expected})["prompt"] == \
        post_ok(server, "/detokenize", {"tokens": tokens(server, prompt=text)})["prompt"]
    return expected


def test_llama_2_chat(servers: Servers) -> None:
    text = ("<s>[INST] <<SYS>>\nBe brief.\n\nAnswer in French.\n<</SYS>>\n\nHi there [/INST] "
            "Hello! </s><s>[INST] Bye [/INST]")
    ids = assert_prompt_is(servers.llama, text, add_special_tokens=False)
    # "<s>" and "</s>" written by the template are the special tokens, not their characters.
    assert ids[0] == BOS and ids.count(BOS) == 2 and ids.count(EOS) == 1


def test_a_jinja_file_named_in_the_environment(servers: Servers) -> None:
    text = ("<s><system>Be brief.</system>\n<user>Hi there</user>\n<assistant>Hello!</assistant>\n"
            "<system>Answer in French.</system>\n<user>Bye</user>\n<assistant>")
    ids = assert_prompt_is(servers.jinja_file, text, add_special_tokens=False)
    assert ids[0] == BOS and ids.count(BOS) == 1, "the template wrote BOS: none added"


def test_the_checkpoints_own_template(servers: Servers) -> None:
    text = ("|system| Be brief.\n|user| Hi there\n|assistant| Hello!\n"
            "|system| Answer in French.\n|user| Bye\n|assistant|")
    ids = assert_prompt_is(servers.tokenizer, text, add_special_tokens=True)
    assert ids[0] == BOS and ids.count(BOS) == 1, "BOS added once, by the tokenizer"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
def test_a_conversation_the_template_refuses_is_a_400(servers: Servers, path: str) -> None:
    body = {"model": MODEL, "max_tokens": 2,
            "messages": [{"role": "assistant", "content": "I speak first"},
                         {"role": "user", "content": "Fine"}]}
    if path == "/tokenize":
        del body["max_tokens"]
    r = httpx.post(servers.jinja_file.url + path, json=body, timeout=30)
    assert r.status_code == 400, r.text
    validate("ErrorResponse", r.json())
    error = r.json()["error"]
    assert error["param"] == "messages" and error["type"] == "invalid_request_error"
    assert "cannot open with the assistant" in error["message"]
    assert httpx.get(servers.jinja_file.url + "/ready").status_code == 200


def test_a_template_that_cannot_load_stops_the_server(tiny_checkpoint: Path,
                                                     tmp_path: Path) -> None:
    """The synthetic checkpoint's tokenizer_config.json has no chat_template, and a file that
    is not there is no template either: either way the server exits non-zero, saying why."""
    failing = [ServerProcess.fake(tiny_checkpoint, tmp_path / f"{i}.log", "--chat-template",
                                  template)
               for i, template in enumerate(("tokenizer", str(tmp_path / "missing.jinja")))]
    try:
        for server in failing:
            server.start(wait=None)
        codes = [server.wait(60) for server in failing]
    finally:
        stop_all(failing)
    assert all(code != 0 for code in codes), codes
    assert "has no chat_template" in failing[0].log()
    assert "missing.jinja" in failing[1].log()
