"""The official OpenAI SDK (sync and async, streaming and not, strict response validation) and
raw HTTP against a real server process over the fake engine; every response and stream chunk
is checked against the official schemas."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.fake_engine import FAULT_MARKER, ServerProcess, sse_data
from tests.schemas.validate import validate
from tests.server import strict_client

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "tiny"
MAX_TOKENS_LIMIT = 40


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("sdk") / "server.log"
    with ServerProcess.fake(tiny_checkpoint, log, "--served-model-name", MODEL,
                            "--api-key", KEY, "--max-model-len", "256",
                            "--max-tokens-limit", str(MAX_TOKENS_LIMIT)).start() as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return strict_client(server, KEY)


def post(server: ServerProcess, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=30, headers=AUTH)


def completion(server: ServerProcess, **body: Any) -> dict[str, Any]:
    r = post(server, "/v1/completions", {"model": MODEL, **body})
    assert r.status_code == 200, r.text
    out = r.json()
    validate("CreateCompletionResponse", out)
    return out


def chat(server: ServerProcess, **body: Any) -> dict[str, Any]:
    r = post(server, "/v1/chat/completions", {"model": MODEL, **body})
    assert r.status_code == 200, r.text
    out = r.json()
    validate("CreateChatCompletionResponse", out)
    return out


def stream(server: ServerProcess, path: str, **body: Any) -> list[dict[str, Any]]:
    """The JSON chunks of a stream, each validated; asserts [DONE] comes last, once."""
    r = post(server, path, {"model": MODEL, "stream": True, **body})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    data = sse_data(r.text)
    assert data[-1] == "[DONE]" and "[DONE]" not in data[:-1]
    chunks = [json.loads(d) for d in data[:-1]]
    schema = ("CreateChatCompletionStreamResponse" if "chat" in path
              else "CreateCompletionStreamChunk")
    for chunk in chunks:
        validate(schema, chunk)
    return chunks


# ---- the SDK ----------------------------------------------------------------------------------


def test_sync_sdk_completes_and_chats(client: openai.OpenAI) -> None:
    done = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=5,
                                     temperature=0)
    assert done.object == "text_completion" and done.id.startswith("cmpl-")
    assert done.choices[0].finish_reason == "length" and done.choices[0].text
    assert done.usage is not None and done.usage.completion_tokens == 5
    # The SDK types a legacy completion chunk's finish_reason as non-null, yet OpenAI (and we)
    # send null until the last chunk, so strict validation cannot read a completions stream
    # (from OpenAI either); it streams with the default validation, and the raw chunks are
    # checked against the schema in test_completion_stream_chunks_and_usage.
    lenient = client.with_options()
    lenient._strict_response_validation = False
    pieces = [c.choices[0].text for c in lenient.completions.create(
        model=MODEL, prompt="Hello there", max_tokens=5, temperature=0, stream=True)
        if c.choices]
    assert "".join(pieces) == done.choices[0].text

    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Hi!"}], max_tokens=6,
        temperature=0)
    assert reply.id.startswith("chatcmpl-") and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content and reply.choices[0].finish_reason == "length"
    deltas = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Hi!"}], max_tokens=6,
        temperature=0, stream=True))
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == \
        reply.choices[0].message.content
    assert deltas[-1].choices[0].finish_reason == "length"


async def test_async_sdk_completes_and_chats(server: ServerProcess) -> None:
    async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0,
                                  _strict_response_validation=True) as client:
        done = await client.completions.create(model=MODEL, prompt=["a b", "c d"], n=2,
                                               max_tokens=3)
        assert sorted(c.index for c in done.choices) == [0, 1, 2, 3]
        text = ""
        async for chunk in await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                stream=True, stream_options={"include_usage": True}):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                assert chunk.usage is None
            else:
                assert chunk.usage is not None and chunk.usage.completion_tokens == 4
        assert text
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]
        assert (await client.models.retrieve(MODEL)).id == MODEL


def test_sdk_raises_the_right_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       temperature=3)
    assert bad.value.param == "temperature"
    anonymous = client.with_options(api_key="wrong")
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()


# ---- responses against the schemas ---------------------------------------------------------


def test_completion_stream_chunks_and_usage(server: ServerProcess) -> None:
    full = completion(server, prompt="Once upon", max_tokens=6, temperature=0)
    chunks = stream(server, "/v1/completions", prompt="Once upon", max_tokens=6,
                    temperature=0, stream_options={"include_usage": True})
    *body, last = chunks
    assert last["choices"] == [] and last["usage"] == full["usage"]
    assert all("usage" not in c for c in body), "the completions chunk schema has no null usage"
    assert [c["choices"][0]["finish_reason"] for c in body][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in body[:-1])
    assert "".join(c["choices"][0]["text"] for c in body) == full["choices"][0]["text"]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")


def test_chat_stream_shape(server: ServerProcess) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hello"},
                                             {"type": "text", "text": " there"}]}]
    full = chat(server, messages=messages, max_completion_tokens=5, temperature=0)
    message = full["choices"][0]["message"]
    assert message["refusal"] is None and full["choices"][0]["logprobs"] is None
    chunks = stream(server, "/v1/chat/completions", messages=messages,
                    max_completion_tokens=5, temperature=0,
                    stream_options={"include_usage": True})
    first, *middle, finish, usage = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["usage"] is None for c in chunks[:-1])
    assert all(c["choices"][0]["finish_reason"] is None for c in [first, *middle])
    assert finish["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"] == full["usage"]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == \
        message["content"]
    plain = stream(server, "/v1/chat/completions", messages=messages, max_tokens=2)
    assert all("usage" not in c for c in plain)


def test_n_and_prompt_lists_index_choices_per_prompt(server: ServerProcess) -> None:
    solo = [completion(server, prompt=p, max_tokens=4, temperature=0)["choices"][0]["text"]
            for p in ("red fish", "blue fish")]
    both = completion(server, prompt=["red fish", "blue fish"], n=2, max_tokens=4,
                      temperature=0)
    texts = {c["index"]: c["text"] for c in both["choices"]}
    assert texts == {0: solo[0], 1: solo[0], 2: solo[1], 3: solo[1]}
    assert both["usage"]["completion_tokens"] == 16
    chunks = stream(server, "/v1/completions", prompt=["red fish", "blue fish"], n=2,
                    max_tokens=4, temperature=0)
    streamed: dict[int, str] = {}
    for c in chunks:
        for choice in c["choices"]:
            streamed[choice["index"]] = streamed.get(choice["index"], "") + choice["text"]
    assert streamed == texts
    replies = chat(server, messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=3,
                   seed=5)
    assert [c["index"] for c in replies["choices"]] == [0, 1]


def test_token_id_prompts(server: ServerProcess) -> None:
    ids = post(server, "/tokenize", {"prompt": "red fish"}).json()["tokens"]
    as_text = completion(server, prompt="red fish", max_tokens=4, temperature=0)
    assert completion(server, prompt=ids, max_tokens=4, temperature=0)["choices"][0]["text"] \
        == as_text["choices"][0]["text"]
    both = completion(server, prompt=[ids, ids[1:]], max_tokens=2, temperature=0)
    assert [c["index"] for c in both["choices"]] == [0, 1]
    assert both["usage"]["prompt_tokens"] == 2 * len(ids) - 1


def test_stop_strings_cut_the_text(server: ServerProcess) -> None:
    prompt = "The weather today"
    text = completion(server, prompt=prompt, max_tokens=12, temperature=0)["choices"][0]["text"]
    words = text.split()
    # Stop at the fourth word (its first occurrence) and at a string spanning two tokens.
    stop = " " + words[3]
    cut = text[:text.index(stop)]
    for body in ({"stop": stop}, {"stop": ["zzz", stop]}):
        done = completion(server, prompt=prompt, max_tokens=12, temperature=0, **body)
        assert done["choices"][0] == {**done["choices"][0], "text": cut, "finish_reason": "stop"}
        chunks = stream(server, "/v1/completions", prompt=prompt, max_tokens=12, temperature=0,
                        **body)
        assert "".join(c["choices"][0]["text"] for c in chunks) == cut
    span = words[1][-1] + " " + words[2][:1]
    done = completion(server, prompt=prompt, max_tokens=12, temperature=0, stop=span)
    assert done["choices"][0]["text"] == text[:text.index(span)]
    reply = chat(server, messages=[{"role": "user", "content": prompt}], max_tokens=12,
                 temperature=0, stop=[])
    words = reply["choices"][0]["message"]["content"].split()
    stopped = chat(server, messages=[{"role": "user", "content": prompt}], max_tokens=12,
                   temperature=0, stop=words[2])
    assert words[2] not in stopped["choices"][0]["message"]["content"]
    assert stopped["choices"][0]["finish_reason"] == "stop"


def test_stop_token_ids_eos_and_ignore_eos(server: ServerProcess) -> None:
    ids = post(server, "/tokenize", {"prompt": "x"}).json()["tokens"]
    eos = 2
    assert eos not in ids
    ended = completion(server, prompt="x", max_tokens=5, logit_bias={str(eos): 100})
    assert ended["choices"][0]["text"] == "" and ended["choices"][0]["finish_reason"] == "stop"
    assert ended["usage"]["completion_tokens"] == 1
    kept = completion(server, prompt="x", max_tokens=5, logit_bias={str(eos): 100},
                      ignore_eos=True)
    assert kept["choices"][0]["finish_reason"] == "length"
    later = completion(server, prompt="x", max_tokens=5, logit_bias={str(eos): 100},
                       min_tokens=3)
    assert later["usage"]["completion_tokens"] == 3
    first = completion(server, prompt="x", max_tokens=6, temperature=0, logprobs=0)
    third = first["choices"][0]["logprobs"]["tokens"][2]
    # A word piece reads " word"; tokenizing "word" alone gives that piece back.
    (token_id,) = post(server, "/tokenize", {"prompt": third.strip(),
                                             "add_special_tokens": False}).json()["tokens"]
    stopped = completion(server, prompt="x", max_tokens=6, temperature=0,
                         stop_token_ids=[token_id])
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["usage"]["completion_tokens"] == 3


def test_echo_and_logprobs(server: ServerProcess) -> None:
    prompt = "Hello there"
    plain = completion(server, prompt=prompt, max_tokens=4, temperature=0, logprobs=2)
    lp = plain["choices"][0]["logprobs"]
    assert "".join(lp["tokens"]) == plain["choices"][0]["text"]
    assert lp["text_offset"][0] == len(prompt)
    assert all(len(top) <= 2 for top in lp["top_logprobs"])
    assert all(top[t] == v for t, v, top in zip(lp["tokens"], lp["token_logprobs"],
                                                lp["top_logprobs"], strict=True))

    echoed = completion(server, prompt=prompt, max_tokens=4, temperature=0, logprobs=1,
                        echo=True)
    choice = echoed["choices"][0]
    assert choice["text"] == prompt + plain["choices"][0]["text"]
    elp = choice["logprobs"]
    # Every token after BOS, prompt and completion, with offsets into the full text.
    assert "".join(elp["tokens"]) == choice["text"]
    for token, offset in zip(elp["tokens"], elp["text_offset"], strict=True):
        assert choice["text"][offset:offset + len(token)] == token
    assert elp["tokens"][-4:] == lp["tokens"]

    only_echo = completion(server, prompt=prompt, max_tokens=1, echo=True)
    assert only_echo["choices"][0]["text"].startswith(prompt)
    assert only_echo["choices"][0]["logprobs"] is None
    chunks = stream(server, "/v1/completions", prompt=prompt, max_tokens=4, temperature=0,
                    logprobs=1, echo=True)
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]] == elp["tokens"]


def test_chat_logprobs(server: ServerProcess) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    reply = chat(server, messages=messages, max_tokens=3, logprobs=True, top_logprobs=3)
    content = reply["choices"][0]["logprobs"]["content"]
    assert "".join(e["token"] for e in content) == reply["choices"][0]["message"]["content"]
    assert all(len(e["top_logprobs"]) == 3 and bytes(e["bytes"]).decode() == e["token"]
               for e in content)
    chunks = stream(server, "/v1/chat/completions", messages=messages, max_tokens=3,
                    logprobs=True)
    streamed = [e for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                for e in c["choices"][0]["logprobs"]["content"]]
    assert len(streamed) == 3 and all(e["top_logprobs"] == [] for e in streamed)


def test_seeded_sampling_is_reproducible(server: ServerProcess) -> None:
    def sample(seed: int, n: int = 1) -> list[str]:
        out = completion(server, prompt="Pick words:", max_tokens=12, temperature=1.0,
                         seed=seed, n=n)
        return [c["text"] for c in out["choices"]]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    pair = sample(7, n=2)
    assert pair == sample(7, n=2) and pair[0] != pair[1] and pair[0] == sample(7)[0]


def test_max_tokens_defaults_to_the_rest_of_the_context_within_the_limit(
        server: ServerProcess) -> None:
    done = completion(server, prompt="Tell me", temperature=0)
    assert done["usage"]["completion_tokens"] == MAX_TOKENS_LIMIT
    assert done["choices"][0]["finish_reason"] == "length"
    prompt = list(range(10, 10 + 240))
    tight = completion(server, prompt=prompt, temperature=0)
    assert tight["usage"]["completion_tokens"] == 256 - 240


def test_default_chat_template_and_tokenize(server: ServerProcess) -> None:
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": "Bye"}]
    expected = ("### System:\nBe kind.\n\n### User:\nHi\n\n### Response:\nHello!\n\n"
                "### System:\nBe brief.\n\n### User:\nBye\n\n### Response:")
    by_messages = post(server, "/tokenize", {"messages": messages}).json()
    by_prompt = post(server, "/tokenize", {"prompt": expected}).json()
    assert by_messages == by_prompt and by_prompt["max_model_len"] == 256
    assert post(server, "/detokenize", {"tokens": by_prompt["tokens"]}).json() == \
        {"prompt": expected}
    reply = chat(server, messages=messages, max_tokens=1)
    assert reply["usage"]["prompt_tokens"] == by_prompt["count"]


def test_models_version_and_ignored_fields(server: ServerProcess) -> None:
    listed = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    validate("ListModelsResponse", listed.json())
    one = httpx.get(server.url + f"/v1/models/{MODEL}",
                    headers={"Authorization": f"Bearer {KEY}"})
    validate("Model", one.json())
    version = httpx.get(server.url + "/version", headers={"Authorization": f"Bearer {KEY}"})
    assert version.json()["model"]["bits"] == 4
    # The model path is accepted as well as the served name; harmless fields are ignored.
    model_path = version.json()["model"]["model"]
    chat(server, model=model_path, messages=[{"role": "user", "content": "x"}], max_tokens=1,
         user="u1", metadata={"k": "v"}, store=False, service_tier="auto",
         parallel_tool_calls=True, tool_choice="none", response_format={"type": "text"})


def test_an_engine_fault_is_a_500_or_an_error_event_logged_with_the_request_id(
        server: ServerProcess) -> None:
    prompt = f"please {FAULT_MARKER} now"
    r = httpx.post(server.url + "/v1/completions", headers={**AUTH, "X-Request-Id": "trace-42"},
                   json={"model": MODEL, "prompt": prompt, "max_tokens": 5}, timeout=30)
    assert r.status_code == 500 and r.headers["x-request-id"] == "trace-42"
    validate("ErrorResponse", r.json())
    assert "trace-42" in server.log()
    chunks = sse_data(post(server, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 5,
        "stream": True}).text)
    assert chunks[-1] == "[DONE]"
    error = json.loads(chunks[-2])
    assert set(error) == {"error"} and error["error"]["code"] == "internal_error"
    assert json.loads(chunks[0])["choices"][0]["delta"]["role"] == "assistant"
    # Every response carries an id, generated when the client sent none (or an unsafe one).
    plain = httpx.get(server.url + "/health", headers={"X-Request-Id": "a b <script>"})
    assert plain.headers["x-request-id"].startswith("req-")
