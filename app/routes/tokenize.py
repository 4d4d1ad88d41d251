"""POST /tokenize and /detokenize (vLLM's extension endpoints)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.errors import bad_request
from app.json_body import JSONBodyRoute
from app.protocol.common import DetokenizeRequest, TokenizeRequest
from app.routes.common import (
    check_model,
    check_token_ids,
    encode_text,
    render_chat,
    server_state,
)

router = APIRouter(route_class=JSONBodyRoute)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    state = server_state(request)
    engine = state.require_engine()
    if body.model is not None:
        check_model(state, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("give exactly one of 'prompt' or 'messages'", "prompt")
    if body.messages is not None:
        rendered = render_chat(state, body.messages)
        tokens = encode_text(engine, rendered.text, "messages", rendered.add_special_tokens)
    else:
        tokens = encode_text(engine, body.prompt or "", "prompt", body.add_special_tokens)
    return {"tokens": tokens, "count": len(tokens),
            "max_model_len": engine.model_info.max_model_len}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    state = server_state(request)
    engine = state.require_engine()
    if body.model is not None:
        check_model(state, body.model)
    check_token_ids(engine, body.tokens, "tokens")
    return {"prompt": engine.tokenizer.decode(body.tokens)}
