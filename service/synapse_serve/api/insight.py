"""What an instance learned: its weights as a picture, statistics now, and their history after each learning call."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from synapse_serve.api.bodies import encode, response_type
from synapse_serve.api.schemas import COMMON_ERRORS, History, Stats, responses, v1_router
from synapse_serve.api.server import OwnerDep, ServerDep, Server, get_principal, instance_key
from synapse_serve.errors import NotAcceptable
from synapse_serve.names import InstanceKey
from synapse_serve.pictures import OPTIONS, Picture, options_from, render

PNG = "image/png"
Text = Annotated[str | None, Query()]
router = v1_router()
# the picture answers in PNG: its own Accept check instead of the msgpack/JSON one of the other routes
pictures = APIRouter(prefix="/v1", dependencies=[Depends(get_principal)], responses=responses(None, *COMMON_ERRORS))


async def off_loop(server: Server, owner: str, fn: Callable[..., Any], *args: Any) -> Any:
    """CPU work (drawing) on one of the API's threads within the owner's share of them, never on the event loop;
    where the backend runs calls in the caller's thread (the blocking in-process client): here, whether or not the
    caller's thread has a loop running (a notebook)."""
    if getattr(server.backend, "in_caller_thread", False):
        return fn(*args)
    return await server.threads.run(owner, fn, *args)


async def draw(server: Server, key: InstanceKey, query: Mapping[str, Any]) -> Picture:
    """The instance's compartment drawn as the query says (options checked before anything is read)."""
    options = options_from(query)
    values, _ = await server.backend.read(key, compartment=options.compartment)
    return await off_loop(server, key.owner, render, values, options)


def _accepts_png(request: Request) -> None:
    accept = request.headers.get("accept", "")
    wanted = [part.split(";")[0].strip().lower() for part in accept.split(",") if part.strip()]
    if wanted and not any(m in (PNG, "image/*", "*/*") for m in wanted):
        raise NotAcceptable(f"cannot answer in {accept[:120]!r}; the picture is {PNG}")


@pictures.get(
    "/synapses/{name}/filters.png", tags=["insight"], summary="The weights (or another compartment) as a PNG grid",
    description="Query: compartment (weights, dWeights, …), normalize (tile, global, symmetric), scale (pixels "
                "per weight, 1-64), columns, tile (h,w: a dense synapse's tile), padding (0-16). Headers X-Tiles, "
                "X-Tile-Shape, X-Grid (rows,columns) and X-Scale say the layout; ETag the version drawn.",
    responses={200: {"content": {PNG: {}}, "description": "a PNG image"}, **responses(None, 404, 406, 422)})
async def filters_png(name: str, request: Request, server: ServerDep, owner: OwnerDep,
                      compartment: Text = None, normalize: Text = None, scale: Text = None, columns: Text = None,
                      tile: Text = None, padding: Text = None) -> Response:
    _accepts_png(request)  # the options are read as sent (unknown ones are refused by name), documented above
    query = {k: v for k, v in request.query_params.items() if k != "owner"}
    picture = await draw(server, instance_key(owner, name), query)
    return Response(picture.png, media_type=PNG, headers={**picture.headers(), "Cache-Control": "no-store"})


@router.get("/synapses/{name}/stats", tags=["insight"], summary="Statistics of the weights, the last update, biases",
            responses=responses(Stats, 404))
async def stats(name: str, request: Request, server: ServerDep, owner: OwnerDep) -> Response:
    return encode(await server.backend.stats(instance_key(owner, name)), response_type(request))


@router.get("/synapses/{name}/history", tags=["insight"],
            summary="Statistics after each learning call (the last SYNAPSE_HISTORY_LENGTH)",
            responses=responses(History, 404))
async def history(name: str, request: Request, server: ServerDep, owner: OwnerDep) -> Response:
    return encode(await server.backend.history(instance_key(owner, name)), response_type(request))


__all__ = ["OPTIONS", "draw", "pictures", "router"]
