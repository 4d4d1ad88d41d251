"""GET /v1/models and /v1/models/{id}"""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.errors import OpenAIError
from app.protocol.common import ModelCard, ModelList
from app.routes.common import server_state

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    state = server_state(request)
    created = int(state.started)
    return ModelList(data=[ModelCard(id=name, created=created)
                           for name in state.settings.model_names])


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> ModelCard:
    state = server_state(request)
    if model_id not in state.settings.model_names:
        raise OpenAIError(404, f"the model '{model_id}' does not exist", param="model",
                          code="model_not_found")
    return ModelCard(id=model_id, created=int(state.started))
