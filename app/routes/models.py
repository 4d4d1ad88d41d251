"""GET /v1/models and /v1/models/{id}: the base model's served names, then each LoRA adapter
(with the base as its ``parent``, as vLLM lists them)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.errors import OpenAIError
from app.protocol.common import ModelCard, ModelList
from app.routes.common import server_state
from app.state import ServerState

router = APIRouter()


def model_cards(state: ServerState) -> list[ModelCard]:
    created = int(state.started)
    settings = state.settings
    cards = [ModelCard(id=name, created=created, root=settings.model)
             for name in settings.model_names]
    if state.engine is not None:
        parent = settings.model_names[0]
        cards += [ModelCard(id=a.name, created=created, root=a.source, parent=parent)
                  for a in state.engine.lora_adapters()]
    return cards


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    return ModelList(data=model_cards(server_state(request)))


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> ModelCard:
    for card in model_cards(server_state(request)):
        if card.id == model_id:
            return card
    raise OpenAIError(404, f"the model '{model_id}' does not exist", param="model",
                      code="model_not_found")
