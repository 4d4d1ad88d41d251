"""docs/api.md names every request parameter the server accepts, and every route."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

from app.main import create_app
from app.protocol.chat import ChatCompletionRequest
from app.protocol.completions import CompletionRequest
from app.settings import Settings

DOC = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()


@pytest.mark.parametrize("model", [CompletionRequest, ChatCompletionRequest])
def test_every_request_field_is_documented(model: type) -> None:
    missing = [name for name in model.model_fields if f"`{name}`" not in DOC]
    assert not missing, f"docs/api.md does not say whether these are supported: {missing}"


def api_routes(app: FastAPI) -> list[APIRoute]:
    """The app's API routes; FastAPI 0.165 keeps an included router's routes on the router."""
    out: list[APIRoute] = []
    for route in app.routes:
        if isinstance(route, APIRoute):
            out.append(route)
        elif hasattr(route, "original_router"):
            out += [r for r in route.original_router.routes if isinstance(r, APIRoute)]
    return out


@pytest.mark.parametrize("runtime_lora", [False, True])
def test_every_route_is_documented(runtime_lora: bool) -> None:
    app = create_app(Settings(allow_runtime_lora_updating=runtime_lora), engine=None)
    routes = api_routes(app)
    assert {"/v1/completions", "/v1/models"} <= {r.path for r in routes}
    for route in routes:
        if isinstance(route, APIRoute):
            for method in route.methods:
                path = route.path.replace("{model_id:path}", "{id}")
                assert f"`{method} {path}`" in DOC, f"{method} {path}"
