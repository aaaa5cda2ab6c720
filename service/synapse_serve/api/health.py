"""Health: liveness, readiness and the metrics scrape (outside /v1: probes and scrapers call them)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from synapse_serve.api.schemas import responses
from synapse_serve.api.server import ServerDep, get_principal
from synapse_serve.errors import NotReady

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers; storage health")
async def healthz(server: ServerDep) -> dict[str, str]:
    error = server.backend.storage_error()
    return {"status": "ok", "storage": f"failing: {error}" if error else "ok"}


@router.get("/readyz", summary="Readiness: restored, warm, and the devices compute", responses=responses(None, 503))
async def readyz(server: ServerDep) -> dict[str, str]:
    if not server.ready.is_set():
        raise NotReady(f"the server is not ready yet: {server.phase}", phase=server.phase)
    try:  # a tiny computation on every device, off the event loop (a cluster: also how many shards are up)
        detail = await server.backend.probe()
    except NotReady as exc:
        raise NotReady(exc.detail, phase="shards down") from None
    except Exception as exc:  # a device that fails or hangs makes the server unready, not dead
        raise NotReady(f"a device is unusable: {type(exc).__name__}: {str(exc)[:200]}", phase="device unusable") \
            from None
    return {"status": "ready", **(detail or {})}


@router.get("/metrics", summary="Prometheus metrics (text format)",
            responses={200: {"content": {"text/plain": {}}}, **responses(None, 401)})
async def metrics(request: Request, server: ServerDep) -> Response:
    principal = None
    if server.tokens is None:
        principal = get_principal(request)  # auth off: the local admin
    elif not server.settings.metrics_open or request.headers.get("authorization"):
        principal = get_principal(request)  # a token: what its owner may see (401 without one)
    gauges = await server.backend.gauges()
    return Response(server.metrics.render(gauges, principal), media_type="text/plain; version=0.0.4")
