"""Operators: devices, storage health, every instance, eviction (admin routes answer 404 to others)."""

from __future__ import annotations

import math

from fastapi import Request
from fastapi.responses import Response

from synapse_serve.api.bodies import encode, read_body, require_fields, response_type
from synapse_serve.api.schemas import EvictRequest, body_doc, v1_router
from synapse_serve.api.server import PrincipalDep, ServerDep, require_admin
from synapse_serve.errors import InvalidRequest

router = v1_router()
ADMIN_LISTING = ("owner", "name", "kind", "device", "state_bytes", "version", "durability", "created_at",
                 "last_used_at")


@router.get("/admin/storage", tags=["operations admin"],
            summary="Admins: durability mode, storage health, files that were not restored")
async def storage_status(request: Request, server: ServerDep, principal: PrincipalDep) -> Response:
    require_admin(principal)
    return encode(await server.backend.storage(), response_type(request))


@router.get("/admin/instances", tags=["operations admin"],
            summary="Admins: every instance with owner, kind, device, state bytes, version and last use")
async def admin_instances(request: Request, server: ServerDep, principal: PrincipalDep) -> Response:
    require_admin(principal)
    rows = await server.backend.list(owner=None)  # 10,000 at most: written off the loop, as every long answer
    return encode({"instances": [{k: row[k] for k in ADMIN_LISTING} for row in rows]}, response_type(request))


@router.post("/admin/evict", tags=["operations admin"],
             summary="Admins: export, then delete, instances idle for idle_s seconds; reports what was evicted",
             openapi_extra=body_doc(EvictRequest))
async def admin_evict(request: Request, server: ServerDep, principal: PrincipalDep) -> Response:
    require_admin(principal)
    body, media = await read_body(request)
    require_fields(body, EvictRequest)
    idle_s = body["idle_s"]
    if isinstance(idle_s, bool) or not isinstance(idle_s, (int, float)) or not _finite_non_negative(idle_s):
        raise InvalidRequest(f"idle_s: expected a finite number >= 0, received {str(idle_s)[:40]!r}", field="idle_s")
    swept = await server.backend.evict_idle(idle_s=float(idle_s))
    return encode({"evicted": swept["evicted"], "stayed": swept["stayed"]}, response_type(request, media))


def _finite_non_negative(value: float) -> bool:
    try:
        return math.isfinite(float(value)) and value >= 0
    except OverflowError:  # an integer beyond any float
        return False


@router.get("/devices", tags=["operations admin"], summary="The devices instances are placed on, with their load")
async def devices(request: Request, server: ServerDep) -> Response:
    return encode({"devices": await server.backend.devices()}, response_type(request))
