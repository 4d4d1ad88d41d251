"""GET /metrics (Prometheus text format)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.routes.common import server_state

router = APIRouter()


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = server_state(request)
    m = state.metrics
    m.ready.set(1 if state.ready and not state.draining else 0)
    m.draining.set(1 if state.draining else 0)
    return Response(generate_latest(m.exposition), media_type=CONTENT_TYPE_LATEST)
