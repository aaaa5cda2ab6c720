"""Kinds: what synapses the server offers, and each one's help."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response

from synapse_serve.api.bodies import encode, response_type
from synapse_serve.api.schemas import responses, v1_router
from synapse_serve.api.server import ServerDep

router = v1_router()


@router.get("/kinds", tags=["kinds"], summary="List the synapse kinds")
async def list_kinds(request: Request, server: ServerDep) -> Response:
    return encode({"kinds": server.backend.kinds()}, response_type(request))


@router.get("/kinds/{kind}", tags=["kinds"], summary="A kind's help: hyperparameters, compartments, dynamics",
            responses=responses(None, 404))
async def kind_help(kind: str, request: Request, server: ServerDep) -> Response:
    return encode(server.backend.kind_help(kind), response_type(request))
