"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter, with vLLM's bodies and answers.

Mounted only with --allow-runtime-lora-updating (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING).
A bad adapter is a 400 naming the problem and changes nothing; unloading an unknown name is a
404. Success is vLLM's plain-text sentence.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from app.errors import OpenAIError, bad_request, engine_unavailable
from app.protocol.common import RequestModel
from app.routes.common import server_state
from engine.client import EngineDeadError
from engine.lora.spec import LoraError, LoraSpec

router = APIRouter()


class LoadLoraAdapterRequest(RequestModel):
    lora_name: str
    # A PEFT adapter folder, or a hub repo id with an optional "@revision".
    lora_path: str
    # Replace an adapter already loaded under this name (requests running keep the old one).
    load_inplace: bool = False


class UnloadLoraAdapterRequest(RequestModel):
    lora_name: str
    lora_int_id: int | None = None  # accepted for vLLM compatibility; names identify adapters


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoraAdapterRequest, request: Request
                            ) -> PlainTextResponse:
    state = server_state(request)
    engine = state.require_engine()
    if body.lora_name in state.settings.model_names or body.lora_name == state.settings.model:
        raise bad_request(f"'{body.lora_name}' is the base model's name; choose another "
                          "lora_name", "lora_name")
    try:
        spec = LoraSpec.of(body.lora_name, body.lora_path)
        await engine.load_lora(spec, replace=body.load_inplace)
    except LoraError as exc:
        raise bad_request(str(exc), "lora_path" if exc.code == "invalid_lora" else "lora_name",
                          code=exc.code) from exc
    except EngineDeadError as exc:
        raise engine_unavailable() from exc
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, request: Request
                              ) -> PlainTextResponse:
    engine = server_state(request).require_engine()
    try:
        await engine.unload_lora(body.lora_name)
    except LoraError as exc:
        status = 404 if exc.code == "lora_not_found" else 400
        raise OpenAIError(status, str(exc), param="lora_name", code=exc.code) from exc
    except EngineDeadError as exc:
        raise engine_unavailable() from exc
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
