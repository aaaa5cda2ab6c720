"""Routes, one handler per verb: decode, call the registry in a worker thread, encode."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from synapse_serve.api.bodies import (
    JSON,
    MSGPACK,
    OCTET,
    PROBLEM,
    encode,
    idempotency_key,
    if_match,
    read_body,
    read_raw,
    response_type,
    tensor_field,
)
from synapse_serve.auth import LOCAL, Principal
from synapse_serve.errors import MalformedBody, NotFound, NotReady, SynapseServeError, Unauthorized
from synapse_serve.kinds import KINDS, get_kind
from synapse_serve.registry import NAME_RULE, Registry, WouldBlock, qualify


# operation labels of the metrics: the kinds' operations (anything else counts as "unknown")
KNOWN_OPERATIONS = frozenset(op for kind in KINDS.values() for op in kind.operations)


async def off_loop(registry: Registry, fn: Callable[..., Any], *args: Any) -> Any:
    """Run blocking registry work on the registry's worker threads, never on the event loop."""
    return await asyncio.get_running_loop().run_in_executor(registry.executor, functools.partial(fn, *args))


def get_registry(request: Request) -> Registry:
    return request.app.state.registry


def get_principal(request: Request) -> Principal:
    """The caller, from ``Authorization: Bearer <token>``; everyone is the local admin when auth is off."""
    tokens = request.app.state.tokens
    if tokens is None:
        request.state.owner = LOCAL.owner
        return LOCAL
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("this server needs a bearer token: send Authorization: Bearer <token>")
    principal = tokens.authenticate(token.strip())
    if principal is None:
        raise Unauthorized("the bearer token is not valid")
    request.state.owner = principal.owner  # for the access log
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def get_owner(principal: PrincipalDep,
              owner: Annotated[str | None, Query(description="admin only: act on this owner's instances")] = None
              ) -> str:
    """Whose instances a call addresses: the caller's own, or (admins only) the named owner's."""
    if owner is None or owner == principal.owner:
        return principal.owner
    if not principal.admin:  # as if nothing were there: names of other owners do not leak
        raise NotFound("no such instance")
    return owner


RegistryDep = Annotated[Registry, Depends(get_registry)]
OwnerDep = Annotated[str, Depends(get_owner)]

# --- schemas (documentation of the bodies; JSON and msgpack carry the same fields) ---


class Tensor(BaseModel):
    """A tensor. msgpack: ``{dtype, shape, data: bin}``; JSON: ``{dtype, shape, values}`` or a nested list."""

    dtype: str = Field(examples=["float32"])
    shape: list[int]
    data: bytes | None = Field(None, description="msgpack only: little-endian C-order bytes")
    values: list[Any] | None = Field(None, description="JSON only: nested lists of numbers")


class CreateRequest(BaseModel):
    name: str = Field(description=NAME_RULE, examples=["enc"])
    kind: str = Field(examples=["HebbianDeconvSynapse"])
    config: dict[str, Any] = Field(examples=[{"shape": [3, 3, 1, 4], "x_shape": [8, 8], "eta": 0.01}])
    init: dict[str, Tensor] | None = Field(None, description="explicit initial tensors: weights, biases")
    seed: int = Field(0, ge=0, description="seeds the default initialisers")
    durability: str | None = Field(None, description="sync, interval or off for this instance; default: the server's")
    device: str | int | None = Field(None, description="place it on this device ('cpu:0', 'cuda:1', or an index; "
                                                       "see GET /v1/devices); default: the least filled")


class Ref(BaseModel):
    """A compartment already on the server, used as a tensor argument without sending it."""

    ref: str = Field(description="compartment name, e.g. inputs, outputs, dInputs", examples=["inputs"])
    instance: str | None = Field(None, description="another instance of the same owner; default: this one")
    model_config = {"extra": "forbid"}


class OperationRequest(BaseModel):
    inputs: Tensor | Ref | None = Field(None, description="forward, step: (batch, h, w, c_in)")
    pre: Tensor | Ref | None = Field(None, description="evolve: (batch, h, w, c_in)")
    post: Tensor | Ref | None = Field(None, description="evolve, backtransmit, step: (batch, h_out, w_out, c_out)")
    returns: list[str] | None = Field(None, alias="return",
                                      description="compartments to send back (default per operation)")


class OperationResponse(BaseModel):
    version: int
    model_config = {"extra": "allow"}


class Description(BaseModel):
    name: str
    durability: str
    kind: str
    config: dict[str, Any]
    seed: int
    device: str
    version: int
    counters: dict[str, int]
    compartments: dict[str, dict[str, Any]]
    state_bytes: int
    created_at: float
    last_used_at: float


class Problem(BaseModel):
    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    request_id: str | None = None


def _body_doc(model: type[BaseModel], required: bool = True) -> dict[str, Any]:
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": required, "content": {MSGPACK: {"schema": schema}, JSON: {"schema": schema}}}}


def _responses(model: type[BaseModel] | None, *errors: int) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    if model is not None:
        out[200] = {"model": model, "content": {MSGPACK: {}, JSON: {}}}
    for status in errors:
        out[status] = {"model": Problem, "content": {PROBLEM: {}}, "description": "problem details (RFC 9457)"}
    return out


router = APIRouter()
# Any /v1 call may meet these; documenting them everywhere keeps the OpenAPI document honest.
COMMON_ERRORS = (400, 401, 403, 404, 406, 412, 413, 415, 422, 500, 503, 507)
v1 = APIRouter(prefix="/v1", dependencies=[Depends(get_principal)], responses=_responses(None, *COMMON_ERRORS))


@router.get("/healthz", tags=["health"], summary="Liveness: the process answers; storage health")
async def healthz(request: Request) -> dict[str, str]:
    registry = getattr(request.app.state, "registry", None)
    error = registry.storage_error if registry is not None else None
    return {"status": "ok", "storage": f"failing: {error}" if error else "ok"}


PROBE_TIMEOUT_S = 5.0


@router.get("/readyz", tags=["health"], summary="Readiness: restored, warm, and the devices compute",
            responses=_responses(None, 503))
async def readyz(request: Request) -> dict[str, str]:
    if not request.app.state.ready.is_set():
        raise NotReady(f"the server is not ready yet: {request.app.state.phase}", phase=request.app.state.phase)
    registry = request.app.state.registry
    try:  # a tiny computation on every device, off the event loop
        await asyncio.wait_for(off_loop(registry, registry.probe_devices), PROBE_TIMEOUT_S)
    except Exception as exc:  # a device that fails or hangs makes the server unready, not dead
        raise NotReady(f"a device is unusable: {type(exc).__name__}: {str(exc)[:200]}", phase="device unusable") \
            from None
    return {"status": "ready"}


@router.get("/metrics", tags=["health"], summary="Prometheus metrics (text format)",
            responses={200: {"content": {"text/plain": {}}}, **_responses(None, 401)})
async def metrics(request: Request) -> Response:
    settings = request.app.state.settings
    if request.app.state.tokens is not None and not settings.metrics_open:
        get_principal(request)  # any valid token may scrape; SYNAPSE_METRICS_OPEN=true opens it
    registry = getattr(request.app.state, "registry", None)
    render = request.app.state.metrics.render
    # the gauges walk every instance: off the event loop
    body = await off_loop(registry, render, registry) if registry is not None else render(None)
    return Response(body, media_type="text/plain; version=0.0.4")


@v1.get("/admin/storage", tags=["durability"], summary="Durability mode, storage health, files that failed to restore")
async def storage_status(registry: RegistryDep, principal: PrincipalDep) -> dict[str, Any]:
    _require_admin(principal)
    return {"durability": registry.durability, "storage_error": registry.storage_error,
            "restore_errors": registry.restore_errors}


@v1.get("/admin/instances", tags=["operations admin"],
        summary="Admins: every instance with owner, kind, device, state bytes, version and last use")
async def admin_instances(registry: RegistryDep, principal: PrincipalDep) -> dict[str, Any]:
    _require_admin(principal)
    rows = await off_loop(registry, registry.list, None)
    keep = ("owner", "name", "kind", "device", "state_bytes", "version", "durability", "created_at", "last_used_at")
    return {"instances": [{k: row[k] for k in keep} for row in rows]}


class EvictRequest(BaseModel):
    idle_s: float = Field(ge=0, description="evict instances unused for at least this many seconds")


@v1.post("/admin/evict", tags=["operations admin"],
         summary="Admins: export, then delete, instances idle for idle_s seconds; reports what was evicted",
         openapi_extra=_body_doc(EvictRequest))
async def admin_evict(request: Request, registry: RegistryDep, principal: PrincipalDep) -> Response:
    _require_admin(principal)
    body, media = await read_body(request)
    _require_keys(body, {"idle_s"}, {"idle_s"})
    idle_s = body["idle_s"]
    if isinstance(idle_s, bool) or not isinstance(idle_s, (int, float)) or not idle_s >= 0:
        raise MalformedBody(f"idle_s: expected a number >= 0, received {idle_s!r}")
    evicted = await off_loop(registry, registry.evict_idle, float(idle_s))
    return encode({"evicted": evicted}, response_type(request, media))


@v1.get("/devices", tags=["operations admin"], summary="The devices instances are placed on, with their load")
async def devices(registry: RegistryDep) -> dict[str, Any]:
    stats = await off_loop(registry, registry.stats)  # walks every instance
    out = []
    for name, device in zip(registry.device_names(), registry.devices):
        memory = device.memory_stats() or {}
        out.append({"device": name, "kind": getattr(device, "device_kind", device.platform),
                    "state_bytes": stats["state_bytes"][name], "placed_bytes": registry.placed_bytes(device),
                    "budget_bytes": registry.device_budget_bytes,
                    "memory_bytes_in_use": memory.get("bytes_in_use"), "memory_bytes_limit": memory.get("bytes_limit")})
    return {"devices": out}


def _require_admin(principal: Principal) -> None:
    if not principal.admin:  # as if it were not there
        raise NotFound("no such resource")


@v1.get("/kinds", tags=["kinds"], summary="List the synapse kinds")
async def list_kinds(request: Request) -> Response:
    kinds = [{"name": k.name, "description": k.description, "operations": list(k.operations), "help": k.help(None)}
             for k in KINDS.values()]
    return encode({"kinds": kinds}, response_type(request))


@v1.get("/kinds/{kind}", tags=["kinds"], summary="A kind's help: hyperparameters, compartments, dynamics",
        responses=_responses(None, 404))
async def kind_help(kind: str, request: Request) -> Response:
    return encode(get_kind(kind).help(None), response_type(request))


@v1.post("/synapses", status_code=201, tags=["synapses"], summary="Create a named instance",
         openapi_extra=_body_doc(CreateRequest),
         responses={201: {"model": Description, "content": {MSGPACK: {}, JSON: {}}}, **_responses(None, 400, 409, 413, 415, 422)})
async def create(request: Request, registry: RegistryDep, owner: OwnerDep) -> Response:
    body, media = await read_body(request)
    _require_keys(body, {"name", "kind", "config"}, {"name", "kind", "config", "init", "seed", "durability", "device"})
    max_elements = request.app.state.settings.max_tensor_elements
    init = body.get("init") or {}
    if not isinstance(init, dict):
        raise MalformedBody("init: expected a map of tensors (weights, biases)")
    init = {k: tensor_field(init, k, media, max_elements) for k in init}
    seed = body.get("seed", 0)
    key = qualify(owner, body["name"])
    description = await off_loop(registry, registry.create, key, body["kind"], body["config"], init, seed,
                                 body.get("durability"), body.get("device"))
    return encode(description, response_type(request, media), status=201,
                  headers={"Location": f"/v1/synapses/{description['name']}"})


@v1.get("/synapses", tags=["synapses"], summary="Describe every instance")
async def list_synapses(request: Request, registry: RegistryDep, principal: PrincipalDep,
                        owner: OwnerDep) -> Response:
    everyone = principal.admin and "owner" not in request.query_params  # admins see every owner's
    synapses = await off_loop(registry, registry.list, None if everyone else owner)
    return encode({"synapses": synapses}, response_type(request))


@v1.get("/synapses/{name}", tags=["synapses"], summary="Describe an instance", responses=_responses(Description, 404))
async def describe(name: str, request: Request, registry: RegistryDep, owner: OwnerDep) -> Response:
    description = await off_loop(registry, registry.describe, qualify(owner, name))
    return encode(description, response_type(request), headers={"ETag": f'"{description["version"]}"'})


@v1.delete("/synapses/{name}", status_code=204, tags=["synapses"], summary="Delete an instance",
           responses=_responses(None, 404))
async def delete(name: str, request: Request, registry: RegistryDep, owner: OwnerDep) -> Response:
    await off_loop(registry, registry.delete, qualify(owner, name), if_match(request))
    return Response(status_code=204)


@v1.get("/synapses/{name}/export", tags=["durability"], summary="Download the instance as one safetensors file",
        responses={200: {"content": {OCTET: {}}, "description": "safetensors; config and metadata in its header"},
                   **_responses(None, 404)})
async def export(name: str, registry: RegistryDep, owner: OwnerDep) -> Response:
    blob = await off_loop(registry, registry.export, qualify(owner, name))
    return Response(blob, media_type=OCTET,
                    headers={"Content-Disposition": f'attachment; filename="{name}.safetensors"'})


@v1.post("/synapses/import", status_code=201, tags=["durability"],
         summary="Create an instance from an exported file (?name=…)",
         openapi_extra={"requestBody": {"required": True, "content": {OCTET: {"schema": {"type": "string",
                                                                                           "format": "binary"}}}}},
         responses={201: {"model": Description, "content": {MSGPACK: {}, JSON: {}}},
                    **_responses(None, 409, 413, 415, 422)})
async def import_instance(name: str, request: Request, registry: RegistryDep, owner: OwnerDep) -> Response:
    key = qualify(owner, name)
    blob = await read_raw(request, OCTET)
    description = await off_loop(registry, registry.import_, key, blob)
    return encode(description, response_type(request), status=201,
                  headers={"Location": f"/v1/synapses/{description['name']}"})


@v1.get("/synapses/{name}/help", tags=["synapses"], summary="The instance's help, with its hyperparameter values",
        responses=_responses(None, 404))
async def instance_help(name: str, request: Request, registry: RegistryDep, owner: OwnerDep) -> Response:
    # in a thread: help waits for the instance's lock, which a long call may hold
    return encode(await off_loop(registry, registry.help, qualify(owner, name)), response_type(request))


@v1.get("/synapses/{name}/compartments/{compartment:path}", tags=["compartments"],
        summary="Read one compartment", responses=_responses(None, 404, 422))
async def read_compartment(name: str, compartment: str, request: Request, registry: RegistryDep,
                           owner: OwnerDep) -> Response:
    value, version = await off_loop(registry, registry.read, qualify(owner, name), compartment)
    return encode({"name": compartment, "value": value, "version": version}, response_type(request),
                  headers={"ETag": f'"{version}"'})


@v1.put("/synapses/{name}/compartments/{compartment:path}", tags=["compartments"],
        summary="Write one compartment (shape and dtype checked)",
        openapi_extra=_body_doc(OperationResponse), responses=_responses(OperationResponse, 400, 404, 413, 415, 422))
async def write_compartment(name: str, compartment: str, request: Request, registry: RegistryDep,
                            owner: OwnerDep) -> Response:
    key = qualify(owner, name)
    body, media = await read_body(request)
    _require_keys(body, {"value"}, {"value"})
    value = tensor_field(body, "value", media, request.app.state.settings.max_tensor_elements)
    version = await off_loop(registry, registry.write, key, compartment, value, if_match(request))
    return encode({"version": version}, response_type(request, media))


class SnapshotRequest(BaseModel):
    snapshot: str = Field(description=NAME_RULE, examples=["before-run-3"])


class Snapshot(BaseModel):
    snapshot: str
    version: int
    counters: dict[str, int]
    created_at: float


@v1.post("/synapses/{name}/snapshots", status_code=201, tags=["snapshots"],
         summary="Take a named point-in-time copy of the instance",
         openapi_extra=_body_doc(SnapshotRequest),
         responses={201: {"model": Snapshot, "content": {MSGPACK: {}, JSON: {}}}, **_responses(None, 404, 409, 422)})
async def create_snapshot(name: str, request: Request, registry: RegistryDep, owner: OwnerDep) -> Response:
    key = qualify(owner, name)
    body, media = await read_body(request)
    _require_keys(body, {"snapshot"}, {"snapshot"})
    info = await off_loop(registry, registry.snapshot, key, body["snapshot"])
    return encode(info, response_type(request, media), status=201)


@v1.get("/synapses/{name}/snapshots", tags=["snapshots"], summary="List the instance's snapshots",
        responses=_responses(None, 404))
async def list_snapshots(name: str, request: Request, registry: RegistryDep, owner: OwnerDep) -> Response:
    snapshots = await off_loop(registry, registry.snapshots, qualify(owner, name))
    return encode({"snapshots": snapshots}, response_type(request))


@v1.post("/synapses/{name}/snapshots/{snapshot}/restore", tags=["snapshots"],
         summary="Roll the instance back to a snapshot", responses=_responses(OperationResponse, 404))
async def restore_snapshot(name: str, snapshot: str, request: Request, registry: RegistryDep,
                           owner: OwnerDep) -> Response:
    version = await off_loop(registry, registry.restore_snapshot, qualify(owner, name), snapshot, if_match(request))
    return encode({"version": version}, response_type(request))


@v1.delete("/synapses/{name}/snapshots/{snapshot}", status_code=204, tags=["snapshots"],
           summary="Delete a snapshot", responses=_responses(None, 404))
async def delete_snapshot(name: str, snapshot: str, registry: RegistryDep, owner: OwnerDep) -> Response:
    await off_loop(registry, registry.delete_snapshot, qualify(owner, name), snapshot)
    return Response(status_code=204)


@v1.post("/synapses/{name}/{operation}", tags=["operations"],
         summary="Run an operation: forward, evolve, backtransmit, step or reset",
         description="forward `{inputs}` → `{outputs}`; evolve `{pre, post}` → `{}` (ask for dWeights with "
                     "`return`); backtransmit `{post?}` → `{dInputs}`; step `{inputs, post}` → `{outputs, "
                     "dInputs}` (forward, evolve with pre = inputs, backtransmit: one round trip); reset `{}` → "
                     "`{}`. Any tensor argument may instead be `{\"ref\": \"<compartment>\"}` (this instance's "
                     "compartment, as it is when the call starts) or `{\"ref\": …, \"instance\": \"<name>\"}` "
                     "(another instance of yours): the values stay on the server. Every answer carries "
                     "the instance's new `version`. An `Idempotency-Key` header makes a retried call apply once "
                     "(the first answer is returned again); `If-Match: \"<version>\"` makes it a 412 when the "
                     "version has moved.",
         openapi_extra=_body_doc(OperationRequest, required=False),
         responses=_responses(OperationResponse, 400, 404, 412, 413, 415, 422))
async def operate(name: str, operation: str, request: Request, registry: RegistryDep, owner: OwnerDep) -> Response:
    return await run_operation(request, registry, owner, name, operation)


async def run_operation(request: Request, registry: Registry, owner: str, name: str, operation: str) -> Response:
    """Decode, run the operation on a worker thread, encode: the route above and the fast path (fast.py)."""
    target = qualify(owner, name)
    body, media = await read_body(request)
    returns = body.pop("return", None)
    if returns is not None and (not isinstance(returns, list) or not all(isinstance(r, str) for r in returns)):
        raise MalformedBody("return: expected a list of compartment names")
    max_elements = request.app.state.settings.max_tensor_elements
    tensors = {key: tensor_field(body, key, media, max_elements) for key in body}
    key, expected = idempotency_key(request), if_match(request)
    def run(inline: bool = False) -> dict[str, Any]:
        return registry.call(target, operation, tensors, returns, idempotency_key=key, expected_version=expected,
                             inline=inline)

    started, status = time.perf_counter(), 500
    try:
        try:  # a call measured quick, on a free instance, runs here: cheaper than the hop to a worker thread
            result = run(inline=True) if registry.inline_max_s > 0 else await off_loop(registry, run)
        except WouldBlock:
            result = await off_loop(registry, run)
        status = 200
    except SynapseServeError as exc:
        status = exc.status
        raise
    finally:
        request.app.state.metrics.observe_operation(operation if operation in KNOWN_OPERATIONS else "unknown",
                                                    status, time.perf_counter() - started)
    return encode(result, response_type(request, media))


def _require_keys(body: dict[str, Any], required: set[str], allowed: set[str]) -> None:
    missing, unknown = required - body.keys(), body.keys() - allowed
    if missing or unknown:
        parts = ([f"missing {', '.join(sorted(missing))}"] if missing else []) + (
            [f"unknown {', '.join(sorted(map(str, unknown)))}"] if unknown else [])
        raise MalformedBody(f"body: {'; '.join(parts)}; fields are {', '.join(sorted(allowed))}")


OPERATION_ROUTE = next(r for r in v1.routes if r.path == "/v1/synapses/{name}/{operation}")
router.include_router(v1)
__all__ = ["OPERATION_ROUTE", "router"]
