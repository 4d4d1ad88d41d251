"""LoRA through real `gptq-serve serve` processes on the CPU: adapters are model ids of
/v1/models (with their base as parent), the official SDK picks one by model name and gets
transformers + PEFT's greedy tokens, adapters and the base mix in concurrent requests,
adapters load and unload at run time (vLLM's routes and bodies; bad ones are a 400 and the
server goes on), per-model metrics count them, and a bad adapter at start stops the server."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from engine.lora.synth import AdapterSpec
from engine.tokenizer.tokenizer import Tokenizer
from tests.fake_engine import ServerProcess, scrape
from tests.lora_helpers import PeftReference, make_adapter
from tests.schemas.validate import validate
from tests.server import MetricsWatch, real_server, strict_client

pytest.importorskip("peft")

BASE = "tiny-gptq"
KEY = "sk-lora"
AUTH = {"Authorization": f"Bearer {KEY}"}
NUM_TOKENS = 8
SPECS = {"all7": AdapterSpec(rank=8, alpha=16, seed=21),
         "mlp": AdapterSpec(rank=4, alpha=8, seed=22, use_rslora=True,
                            target_modules=("gate_proj", "up_proj", "down_proj")),
         "late": AdapterSpec(rank=8, alpha=8, seed=23, target_modules=("q_proj", "v_proj")),
         "too-big": AdapterSpec(rank=16, alpha=16, seed=24, target_modules=("q_proj",))}


@pytest.fixture(scope="module")
def adapters(lora_root: Path, tiny_checkpoint: Path) -> dict[str, Path]:
    return {name: make_adapter(lora_root, tiny_checkpoint, spec) for name, spec in SPECS.items()}


@pytest.fixture(scope="module")
def ref(tiny_checkpoint: Path) -> PeftReference:
    return PeftReference(tiny_checkpoint)


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, adapters: dict[str, Path],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("lora") / "server.log"
    srv = real_server(tiny_checkpoint, log, "--served-model-name", BASE, "--api-key", KEY,
                      "--lora-modules", f"all7={adapters['all7']}", f"mlp={adapters['mlp']}",
                      "--max-loras", "2", "--max-lora-rank", "8",
                      "--allow-runtime-lora-updating", "--max-model-len", "256",
                      "--num-kv-blocks", "256", "--max-num-batched-tokens", "128")
    with srv.start(timeout=120):
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return strict_client(server, KEY)


def post(server: ServerProcess, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=AUTH, timeout=60)


def greedy_completion(client: openai.OpenAI, model: str, prompt: str) -> list[str]:
    done = client.completions.create(model=model, prompt=prompt, max_tokens=NUM_TOKENS,
                                     temperature=0, logprobs=0,
                                     extra_body={"ignore_eos": True})
    assert done.model == model
    assert done.choices[0].logprobs is not None
    return list(done.choices[0].logprobs.tokens or [])


def expected(ref: PeftReference, tok: Tokenizer, adapter: Path | None, prompt: str
             ) -> list[str]:
    return tok.token_strings(ref.greedy(adapter, tok.encode(prompt), NUM_TOKENS))


def test_adapters_are_models_with_the_base_as_parent(server: ServerProcess,
                                                     adapters: dict[str, Path]) -> None:
    listed = httpx.get(server.url + "/v1/models", headers=AUTH).json()
    validate("ListModelsResponse", listed)
    cards = {m["id"]: m for m in listed["data"]}
    assert list(cards)[:1] == [BASE] and {"all7", "mlp"} <= set(cards)
    assert cards[BASE]["parent"] is None
    assert cards["all7"]["parent"] == BASE and cards["all7"]["root"] == str(adapters["all7"])
    one = httpx.get(server.url + "/v1/models/mlp", headers=AUTH)
    assert one.status_code == 200 and one.json()["parent"] == BASE
    missing = httpx.get(server.url + "/v1/models/nope", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_the_sdk_chooses_an_adapter_by_model_name(server: ServerProcess, client: openai.OpenAI,
                                                  adapters: dict[str, Path],
                                                  ref: PeftReference,
                                                  tiny_checkpoint: Path) -> None:
    tok = Tokenizer.from_pretrained(tiny_checkpoint)
    prompt = "Once upon a time in a small town"
    for model, adapter in ((BASE, None), ("all7", adapters["all7"]),
                           ("mlp", adapters["mlp"])):
        assert greedy_completion(client, model, prompt) == expected(ref, tok, adapter, prompt)
    messages = [{"role": "user", "content": "Say something."}]
    prompt_ids = post(server, "/tokenize", {"model": "all7", "messages": messages}
                      ).json()["tokens"]
    reply = client.chat.completions.create(model="all7", messages=messages,  # type: ignore[arg-type]
                                           max_tokens=NUM_TOKENS, temperature=0, logprobs=True,
                                           extra_body={"ignore_eos": True, "stop": []})
    assert reply.model == "all7" and reply.choices[0].logprobs is not None
    got = [t.token for t in reply.choices[0].logprobs.content or []]
    assert got == tok.token_strings(ref.greedy(adapters["all7"], prompt_ids, NUM_TOKENS))
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="not-an-adapter", prompt="x", max_tokens=1)
    assert err.value.code == "model_not_found"


def test_concurrent_requests_mix_adapters_and_the_base(server: ServerProcess,
                                                       adapters: dict[str, Path],
                                                       ref: PeftReference,
                                                       tiny_checkpoint: Path) -> None:
    tok = Tokenizer.from_pretrained(tiny_checkpoint)
    jobs = [(model, f"Request {i} talks about topic {i * 7}.")
            for i, model in enumerate([BASE, "all7", "mlp"] * 3)]
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)

    async def one(model: str, prompt: str) -> list[str]:
        done = await aclient.completions.create(model=model, prompt=prompt,
                                                max_tokens=NUM_TOKENS, temperature=0,
                                                logprobs=0, extra_body={"ignore_eos": True})
        return list(done.choices[0].logprobs.tokens or [])  # type: ignore[union-attr]

    async def all_jobs() -> list[list[str]]:
        return await asyncio.gather(*(one(m, p) for m, p in jobs))

    with MetricsWatch(server.url) as watch:
        results = asyncio.run(all_jobs())
    for (model, prompt), got in zip(jobs, results, strict=True):
        adapter = None if model == BASE else adapters[model]
        assert got == expected(ref, tok, adapter, prompt), model
    for model in (BASE, "all7", "mlp"):
        assert watch.delta[f'gptq_model_requests_total{{model="{model}"}}'] == 3
        assert watch.delta[f'gptq_model_generation_tokens_total{{model="{model}"}}'] == \
            3 * NUM_TOKENS
    metrics = scrape(server.url)
    info = [k for k in metrics if k.startswith("gptq_lora_adapter_info{")]
    assert any('name="all7"' in k and f'parent="{BASE}"' in k and 'rank="8"' in k
               for k in info)


def test_adapters_load_and_unload_at_run_time(server: ServerProcess, client: openai.OpenAI,
                                              adapters: dict[str, Path], ref: PeftReference,
                                              tiny_checkpoint: Path, tmp_path: Path) -> None:
    tok = Tokenizer.from_pretrained(tiny_checkpoint)
    prompt = "A fresh adapter arrives"
    body = {"lora_name": "late", "lora_path": str(adapters["late"])}
    r = post(server, "/v1/load_lora_adapter", body)
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'late' added successfully."
    assert "late" in [m.id for m in client.models.list().data]
    assert greedy_completion(client, "late", prompt) == expected(ref, tok, adapters["late"],
                                                                 prompt)
    again = post(server, "/v1/load_lora_adapter", body)
    assert again.status_code == 400 and again.json()["error"]["code"] == "lora_exists"
    # load_inplace swaps in other weights under the same name (here: the mlp adapter's).
    swapped = post(server, "/v1/load_lora_adapter", {"lora_name": "late", "load_inplace": True,
                                                     "lora_path": str(adapters["mlp"])})
    assert swapped.status_code == 200
    assert greedy_completion(client, "late", prompt) == expected(ref, tok, adapters["mlp"],
                                                                 prompt)
    # Bad adapters: 400 naming the problem; nothing changes and the server goes on.
    for path, problem in ((adapters["too-big"], "over the server's max_lora_rank 8"),
                          (tmp_path / "absent", "no such checkpoint folder"),
                          (tmp_path, "adapter_config.json: file not found")):
        bad = post(server, "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(path)})
        error = bad.json()["error"]
        assert bad.status_code == 400 and problem in error["message"], error
        assert "LoRA adapter 'bad'" in error["message"] and error["type"] == \
            "invalid_request_error"
    clash = post(server, "/v1/load_lora_adapter", {"lora_name": BASE,
                                                   "lora_path": str(adapters["late"])})
    assert clash.status_code == 400 and clash.json()["error"]["param"] == "lora_name"
    assert "bad" not in [m.id for m in client.models.list().data]
    r = post(server, "/v1/unload_lora_adapter", {"lora_name": "late"})
    assert r.status_code == 200 and r.text == \
        "Success: LoRA adapter 'late' removed successfully."
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late", prompt=prompt, max_tokens=1)
    gone = post(server, "/v1/unload_lora_adapter", {"lora_name": "late"})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "lora_not_found"
    assert greedy_completion(client, "all7", prompt) == expected(ref, tok, adapters["all7"],
                                                                 prompt)


def test_a_bad_adapter_at_start_stops_the_server(tiny_checkpoint: Path,
                                                 adapters: dict[str, Path],
                                                 tmp_path: Path) -> None:
    srv = real_server(tiny_checkpoint, tmp_path / "refused.log", "--lora-modules",
                      f"big={adapters['too-big']}", "--max-lora-rank", "8", "--no-warmup")
    srv.start(wait=None)
    try:
        assert srv.wait(120) != 0
    except subprocess.TimeoutExpired:
        srv.stop()
        raise
    log = srv.log()
    assert "LoRA adapter 'big'" in log and "over the server's max_lora_rank 8" in log, log


def test_the_runtime_routes_exist_only_when_allowed() -> None:
    from app.main import create_app
    from app.settings import Settings
    from tests.test_api_docs import api_routes

    def paths(settings: Settings) -> set[str]:
        return {r.path for r in api_routes(create_app(settings))}

    lora_routes = {"/v1/load_lora_adapter", "/v1/unload_lora_adapter"}
    assert not lora_routes & paths(Settings())
    assert lora_routes <= paths(Settings(allow_runtime_lora_updating=True))
