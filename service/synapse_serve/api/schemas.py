"""The bodies, stated once: Pydantic models document them in the OpenAPI document and say which fields a
request may and must carry (``bodies.require_fields``). Tensors travel as msgpack maps, so handlers read
bodies with the wire codec rather than through these models."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

from synapse_serve.api.bodies import JSON, MSGPACK, PROBLEM, check_acceptable
from synapse_serve.api.server import get_principal
from synapse_serve.names import NAME_RULE


class Tensor(BaseModel):
    """A tensor. msgpack: ``{dtype, shape, data: bin}``; JSON: ``{dtype, shape, values}`` or a nested list."""

    dtype: str = Field(examples=["float32"])
    shape: list[int]
    data: bytes | None = Field(None, description="msgpack only: little-endian C-order bytes")
    values: list[Any] | float | int | bool | None = Field(
        None, description="JSON only: nested lists of numbers (a single number for a 0-d tensor)")


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


class SequenceOptions(BaseModel):
    every: int | None = Field(None, ge=1, description="return the compartments after every k-th step (default 1)")
    last: bool | None = Field(None, description="return them after the last step only, without a time axis")


class OperationRequest(BaseModel):
    inputs: Tensor | Ref | None = Field(None, description="forward, step: (batch, …) inputs-shaped; "
                                                          "(steps, batch, …) runs a sequence")
    pre: Tensor | Ref | None = Field(None, description="evolve: inputs-shaped")
    post: Tensor | Ref | None = Field(None, description="evolve, backtransmit, step: outputs-shaped")
    returns: list[str] | None = Field(None, alias="return",
                                      description="compartments to send back (default per operation)")
    sequence: SequenceOptions | None = Field(
        None, description="for tensors with a leading time axis (a sequence of steps in one call): which steps' "
                          "compartments come back")


class OperationResponse(BaseModel):
    version: int
    model_config = {"extra": "allow"}


class PackedCall(BaseModel):
    name: str = Field(description=NAME_RULE)
    tensors: dict[str, Tensor] = Field(default_factory=dict, description="this instance's tensor arguments")


class PackedRequest(BaseModel):
    """Either ``calls``, or ``names`` and ``tensors`` (the stacked form), not both."""

    calls: list[PackedCall] | None = Field(None, description="one call per instance (each instance at most once)")
    names: list[str] | None = Field(None, description="the stacked form: the instances (each at most once), in the "
                                                      "order of the tensors' leading axis")
    tensors: dict[str, Tensor] | None = Field(None, description="the stacked form: each argument as (instances, "
                                                                "batch, …), slice i for names[i]")
    returns: list[str] | None = Field(None, alias="return", description="compartments to send back for each")


class PackedResult(OperationResponse):
    name: str


class PackedResponse(BaseModel):
    """The answer to ``calls``: one result per call. The stacked form answers a StackedResponse."""

    results: list[PackedResult]


class StackedResponse(BaseModel):
    """The answer to the stacked form: the names, each instance's new version, and each compartment returned
    stacked along a leading instance axis in the order of the names (e.g. ``outputs``: (instances, batch, …))."""

    names: list[str]
    versions: list[int]
    model_config = {"extra": "allow"}


class CompartmentWrite(BaseModel):
    value: Tensor = Field(description="the new value: same shape and dtype (signals may change batch), finite")


class Version(BaseModel):
    version: int


class CompartmentValue(BaseModel):
    name: str
    value: Tensor
    version: int


class Description(BaseModel):
    name: str
    owner: str
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
    running: dict[str, Any] | None = Field(
        None, description="what the call holding the instance runs (operation; steps of a sequence) and since "
                          "when (Unix time); null when idle")
    history_length: int = Field(0, description="statistics samples kept after learning calls (GET …/history)")
    provenance: dict[str, Any] = Field(description="service and JAX versions, the ngclearn release the numbers "
                                                   "follow, device, seed and key schedule")


class ArrayStats(BaseModel):
    size: int
    mean: float | None = None
    std: float | None = None
    min: float | None = None
    max: float | None = None
    norm: float | None = Field(None, description="L2 (Frobenius) norm")
    abs_mean: float | None = None
    sparsity: float | None = Field(None, description="the fraction of values exactly zero")
    filter_norms: list[float] | None = Field(
        None, description="weights only: each filter's L2 norm (a dense synapse's output unit: a column; a "
                          "convolution's output channel: its (kh, kw, c_in) block)")


class Stats(BaseModel):
    name: str
    owner: str
    kind: str
    version: int
    counters: dict[str, int]
    weights: ArrayStats
    update: ArrayStats | None = Field(description="dWeights, the last update (null for kinds that do not learn)")
    biases: ArrayStats | None = Field(description="null for a synapse without biases")


class HistoryEntry(BaseModel):
    version: int = Field(description="the instance's version right after the learning call")
    steps: int = Field(description="weight updates applied so far (evolve and step, every step of a sequence)")
    time: float = Field(description="Unix time of the call")
    mean: float
    std: float
    min: float
    max: float
    norm: float
    sparsity: float
    update_norm: float | None = Field(description="L2 norm of dWeights after the call")


class History(BaseModel):
    name: str
    owner: str
    version: int
    length: int = Field(description="the most entries kept (SYNAPSE_HISTORY_LENGTH); older ones are dropped")
    entries: list[HistoryEntry]


class SnapshotRequest(BaseModel):
    snapshot: str = Field(description=NAME_RULE, examples=["before-run-3"])


class Snapshot(BaseModel):
    snapshot: str
    version: int
    counters: dict[str, int]
    created_at: float


class EvictRequest(BaseModel):
    idle_s: float = Field(ge=0, description="evict instances unused for at least this many seconds")


class Problem(BaseModel):
    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    request_id: str | None = None


def add_request_schemas(document: dict[str, Any]) -> dict[str, Any]:
    """Put the request bodies' models (referenced by ``body_doc``, which FastAPI does not collect, as handlers read
    bodies with the wire codec), the answers ``one_of_answers`` names, and the models they use into the document's
    components."""
    _, top = models_json_schema([(m, "validation") for m in REQUEST_MODELS]
                                + [(m, "serialization") for m in (PackedResponse, StackedResponse)],
                                ref_template=REF_TEMPLATE)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in top.get("$defs", {}).items():
        schemas.setdefault(name, schema)
    return document


def body_doc(model: type[BaseModel], required: bool = True) -> dict[str, Any]:
    schema = {"$ref": REF_TEMPLATE.format(model=model.__name__)}
    return {"requestBody": {"required": required, "content": {MSGPACK: {"schema": schema}, JSON: {"schema": schema}}}}


def one_of_answers(*models: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route whose 200 answer is one of ``models`` (documented by ``add_request_schemas``)."""
    schema = {"oneOf": [{"$ref": REF_TEMPLATE.format(model=model.__name__)} for model in models]}
    return {"responses": {"200": {"content": {MSGPACK: {"schema": schema}, JSON: {"schema": schema}}}}}


def responses(model: type[BaseModel] | None, *errors: int, status: int = 200) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    if model is not None:
        out[status] = {"model": model, "content": {MSGPACK: {}, JSON: {}}}
    for code in errors:
        out[code] = {"model": Problem, "content": {PROBLEM: {}}, "description": "problem details (RFC 9457)"}
    return out


REF_TEMPLATE = "#/components/schemas/{model}"
REQUEST_MODELS = (CreateRequest, OperationRequest, PackedRequest, CompartmentWrite, SnapshotRequest, EvictRequest)

# Any /v1 call may meet these; documenting them everywhere keeps the OpenAPI document honest.
COMMON_ERRORS = (400, 401, 403, 404, 406, 408, 409, 412, 413, 415, 422, 500, 503, 507)
V1_DEPENDENCIES = [Depends(get_principal), Depends(check_acceptable)]


def v1_router() -> APIRouter:
    """A router for one resource under /v1: authenticated, Accept checked before anything runs."""
    return APIRouter(prefix="/v1", dependencies=V1_DEPENDENCIES, responses=responses(None, *COMMON_ERRORS))
