"""Snapshots: named point-in-time copies of an instance, and rolling back to one."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response

from synapse_serve.api.bodies import JSON, MSGPACK, encode, if_match, read_body, require_fields, response_type
from synapse_serve.api.schemas import Snapshot, SnapshotRequest, Version, body_doc, responses, v1_router
from synapse_serve.api.server import OwnerDep, ServerDep, instance_key

router = v1_router()


@router.post("/synapses/{name}/snapshots", status_code=201, tags=["snapshots"],
             summary="Take a named point-in-time copy of the instance",
             openapi_extra=body_doc(SnapshotRequest),
             responses={201: {"model": Snapshot, "content": {MSGPACK: {}, JSON: {}}},
                        **responses(None, 403, 404, 409, 422, 507)})
async def create_snapshot(name: str, request: Request, server: ServerDep, owner: OwnerDep) -> Response:
    key = instance_key(owner, name)
    body, media = await read_body(request)
    require_fields(body, SnapshotRequest)
    info = await server.backend.snapshot(key, snapshot=body["snapshot"])
    return encode(info, response_type(request, media), status=201)


@router.get("/synapses/{name}/snapshots", tags=["snapshots"], summary="List the instance's snapshots",
            responses=responses(None, 404))
async def list_snapshots(name: str, request: Request, server: ServerDep, owner: OwnerDep) -> Response:
    snapshots = await server.backend.snapshots(instance_key(owner, name))
    return encode({"snapshots": snapshots}, response_type(request))


@router.post("/synapses/{name}/snapshots/{snapshot}/restore", tags=["snapshots"],
             summary="Roll the instance back to a snapshot", responses=responses(Version, 404, 412))
async def rollback(name: str, snapshot: str, request: Request, server: ServerDep, owner: OwnerDep) -> Response:
    version = await server.backend.rollback(instance_key(owner, name), snapshot=snapshot,
                                            expected_version=if_match(request))
    return encode({"version": version}, response_type(request))


@router.delete("/synapses/{name}/snapshots/{snapshot}", status_code=204, tags=["snapshots"],
               summary="Delete a snapshot", responses=responses(None, 404))
async def delete_snapshot(name: str, snapshot: str, server: ServerDep, owner: OwnerDep) -> Response:
    await server.backend.delete_snapshot(instance_key(owner, name), snapshot=snapshot)
    return Response(status_code=204)
