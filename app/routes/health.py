"""Liveness, readiness and version: what Kubernetes probes."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from app import __version__
from app.routes.common import server_state

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Liveness: the process serves HTTP and, once loaded, the engine loop is alive."""
    state = server_state(request)
    stats = state.stats()
    if stats is not None and state.serving and not stats.loop_alive:
        return JSONResponse({"status": "engine loop stopped"}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: model loaded, engine loop alive, warm-up passed, not draining."""
    state = server_state(request)
    stats = state.stats()
    if state.draining:
        return JSONResponse({"status": "draining"}, status_code=503,
                            headers={"Retry-After": "5"})
    if not state.ready or stats is None or not stats.loop_alive:
        status = "failed: " + state.load_error if state.load_error else "loading"
        return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "10"})
    return JSONResponse({"status": "ready"})


@router.get("/version")
async def version(request: Request) -> dict:
    state = server_state(request)
    info = state.engine.model_info if state.engine is not None else None
    return {"version": __version__,
            "model": None if info is None else {
                "model": info.model, "revision": info.revision, "bits": info.bits,
                "group_size": info.group_size, "act_order": info.act_order,
                "linear_backend": info.linear_backend,
                "attention_backend": info.attention_backend,
                "max_model_len": info.max_model_len, "device": info.device}}
