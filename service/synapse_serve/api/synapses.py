"""Instances: create, list, describe, delete, help; compartments; export and import; evicted instances."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response

from synapse_serve.api.bodies import (
    MSGPACK,
    OCTET,
    JSON,
    PartsResponse,
    encode,
    if_match,
    init_tensors,
    map_field,
    read_body,
    read_raw,
    require_fields,
    response_type,
    tensor_field,
)
from synapse_serve.api.schemas import (
    CompartmentValue,
    CompartmentWrite,
    CreateRequest,
    Description,
    Version,
    body_doc,
    responses,
    v1_router,
)
from synapse_serve.api.server import OwnerDep, PrincipalDep, ServerDep, instance_key
from synapse_serve.errors import MalformedBody

router = v1_router()
_DESCRIPTION = {201: {"model": Description, "content": {MSGPACK: {}, JSON: {}}}}


@router.post("/synapses", status_code=201, tags=["synapses"], summary="Create a named instance",
             openapi_extra=body_doc(CreateRequest), responses={**_DESCRIPTION, **responses(None, 409, 422)})
async def create(request: Request, server: ServerDep, owner: OwnerDep) -> Response:
    body, media = await read_body(request)
    require_fields(body, CreateRequest)
    init = map_field(body.get("init"), "init (a map of tensors: weights, biases)")
    max_elements = server.settings.max_tensor_elements
    init = init_tensors({k: tensor_field(init, k, media, max_elements) for k in init})
    key = instance_key(owner, body["name"])
    description = await server.backend.create(key, kind=body["kind"], config=body["config"], init=init,
                                              seed=body.get("seed", 0), durability=body.get("durability"),
                                              device=body.get("device"))
    return encode(description, response_type(request, media), status=201,
                  headers={"Location": f"/v1/synapses/{key.name}"})


@router.get("/synapses", tags=["synapses"], summary="Describe every instance (yours; an admin's: everyone's)")
async def list_synapses(request: Request, server: ServerDep, principal: PrincipalDep, owner: OwnerDep) -> Response:
    everyone = principal.admin and "owner" not in request.query_params
    synapses = await server.backend.list(owner=None if everyone else owner)
    return encode({"synapses": synapses}, response_type(request))


@router.get("/synapses/{name}", tags=["synapses"], summary="Describe an instance", responses=responses(Description, 404))
async def describe(name: str, request: Request, server: ServerDep, owner: OwnerDep) -> Response:
    description = await server.backend.describe(instance_key(owner, name))
    return encode(description, response_type(request), headers={"ETag": f'"{description["version"]}"'})


@router.delete("/synapses/{name}", status_code=204, tags=["synapses"], summary="Delete an instance and its snapshots",
               responses=responses(None, 404, 412, 507))
async def delete(name: str, request: Request, server: ServerDep, owner: OwnerDep) -> Response:
    await server.backend.delete(instance_key(owner, name), expected_version=if_match(request))
    return Response(status_code=204)


@router.get("/synapses/{name}/help", tags=["synapses"], summary="The instance's help, with its hyperparameter values",
            responses=responses(None, 404))
async def instance_help(name: str, request: Request, server: ServerDep, owner: OwnerDep) -> Response:
    return encode(await server.backend.help(instance_key(owner, name)), response_type(request))


@router.get("/synapses/{name}/compartments/{compartment:path}", tags=["compartments"],
            summary="Read one compartment", responses=responses(CompartmentValue, 404, 422))
async def read_compartment(name: str, compartment: str, request: Request, server: ServerDep,
                           owner: OwnerDep) -> Response:
    value, version = await server.backend.read(instance_key(owner, name), compartment=compartment)
    return encode({"name": compartment, "value": value, "version": version}, response_type(request),
                  headers={"ETag": f'"{version}"'})


@router.put("/synapses/{name}/compartments/{compartment:path}", tags=["compartments"],
            summary="Write one compartment (shape, dtype, finiteness and max_batch checked)",
            openapi_extra=body_doc(CompartmentWrite), responses=responses(Version, 404, 412, 413, 415, 422))
async def write_compartment(name: str, compartment: str, request: Request, server: ServerDep,
                            owner: OwnerDep) -> Response:
    key = instance_key(owner, name)
    body, media = await read_body(request)
    require_fields(body, CompartmentWrite)
    value = tensor_field(body, "value", media, server.settings.max_tensor_elements)
    if not hasattr(value, "dtype"):
        raise MalformedBody("value: expected a tensor, not a reference")
    version = await server.backend.write(key, compartment=compartment, value=value, expected_version=if_match(request))
    return encode({"version": version}, response_type(request, media))


@router.get("/synapses/{name}/export", tags=["durability"], summary="Download the instance as one safetensors file",
            responses={200: {"content": {OCTET: {}}, "description": "safetensors; config and metadata in its header"},
                       **responses(None, 404)})
async def export(name: str, server: ServerDep, owner: OwnerDep) -> Response:
    key = instance_key(owner, name)
    length, parts = await server.backend.export(key)
    return PartsResponse(parts(), length, 200, OCTET,
                         {"Content-Disposition": f'attachment; filename="{key.name}.safetensors"'})


@router.post("/synapses/import", status_code=201, tags=["durability"],
             summary="Create an instance from an exported file (?name=…)",
             openapi_extra={"requestBody": {"required": True, "content": {OCTET: {"schema": {"type": "string",
                                                                                              "format": "binary"}}}}},
             responses={**_DESCRIPTION, **responses(None, 409, 413, 415, 422)})
async def import_instance(name: str, request: Request, server: ServerDep, owner: OwnerDep) -> Response:
    key = instance_key(owner, name)
    blob = await read_raw(request, OCTET)
    description = await server.backend.import_(key, blob=blob)
    return encode(description, response_type(request), status=201, headers={"Location": f"/v1/synapses/{key.name}"})


@router.get("/evicted", tags=["durability"], summary="Your instances evicted for idleness (the server kept their files)")
async def evicted(request: Request, server: ServerDep, owner: OwnerDep) -> Response:
    return encode({"evicted": await server.backend.evicted(owner=owner)}, response_type(request))


@router.post("/evicted/{name}/restore", status_code=201, tags=["durability"],
             summary="Bring an evicted instance back, as it was when evicted",
             responses={**_DESCRIPTION, **responses(None, 404, 409)})
async def unevict(name: str, request: Request, server: ServerDep, owner: OwnerDep) -> Response:
    key = instance_key(owner, name)
    description = await server.backend.unevict(key)
    return encode(description, response_type(request), status=201, headers={"Location": f"/v1/synapses/{key.name}"})


@router.delete("/evicted/{name}", status_code=204, tags=["durability"],
               summary="Delete an evicted instance's copy for good (its bytes leave your snapshot quota)",
               responses=responses(None, 404, 507))
async def discard_evicted(name: str, request: Request, server: ServerDep, owner: OwnerDep) -> Response:
    await server.backend.discard_evicted(instance_key(owner, name))
    return Response(status_code=204)
