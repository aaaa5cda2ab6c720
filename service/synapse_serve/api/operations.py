"""Operations: ``POST /v1/synapses/{name}/{operation}`` — forward, evolve, backtransmit, step, reset —
and packed calls, ``POST /v1/packed/{operation}``.

Researchers call these in tight loops, and a small synapse's forward costs less than FastAPI's
dependency solving did. So each handler is served twice: by ``OperationRoute``, a plain
Starlette route at the head of the router that matches only the kinds' operation names (an
allow-list) and runs the /v1 caller checks itself, and by the FastAPI route below, which
documents the operation in the OpenAPI document and answers any other name (a 422 naming the
operations). tests/api/test_operation_route.py sends the same requests through both.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from starlette.routing import Match, Route

from synapse_serve.api.bodies import (
    MSGPACK,
    check_acceptable,
    encode,
    idempotency_key,
    if_match,
    problem_from,
    read_body,
    require_fields,
    response_type,
    returns_field,
    tensor_fields,
)
from synapse_serve.api.frames import check_pack_size, most_packed, run_packed
from synapse_serve.api.schemas import (
    OperationRequest,
    OperationResponse,
    PackedRequest,
    PackedResponse,
    StackedResponse,
    body_doc,
    one_of_answers,
    responses,
    v1_router,
)
from synapse_serve.api.server import (
    Counted,
    OwnerDep,
    Server,
    ServerDep,
    get_owner,
    get_principal,
    instance_key,
)
from synapse_serve.errors import InvalidFields, MalformedBody, SynapseServeError

router = v1_router()
PATH = "/v1/synapses/{name}/{operation}"
PACKED_PATH = "/v1/packed/{operation}"


@router.post(PATH.removeprefix("/v1"), tags=["operations"],
             summary="Run an operation: forward, evolve, backtransmit, step or reset",
             description="forward `{inputs}` → `{outputs}`; evolve `{pre, post}` → `{}` (ask for dWeights with "
                         "`return`); backtransmit `{post?}` → `{dInputs}`; step `{inputs, post}` → `{outputs, "
                         "dInputs}` (forward, evolve with pre = inputs, backtransmit: one round trip); reset `{}` → "
                         "`{}`. Tensors with a leading time axis `(steps, batch, …)` run the operation that many "
                         "steps in one compiled call (`sequence: {every, last}` picks which steps come back). Any "
                         "tensor argument may instead be `{\"ref\": \"<compartment>\"}` (this instance's "
                         "compartment, as it is when the call starts) or `{\"ref\": …, \"instance\": \"<name>\"}` "
                         "(another instance of yours): the values stay on the server. Every answer carries "
                         "the instance's new `version`. An `Idempotency-Key` header makes a retried call apply once "
                         "(the first answer is returned again); `If-Match: \"<version>\"` makes it a 412 when the "
                         "version has moved.",
             openapi_extra=body_doc(OperationRequest, required=False),
             responses=responses(OperationResponse, 400, 403, 404, 409, 412, 413, 415, 422, 507))
async def operate(name: str, operation: str, request: Request, server: ServerDep, owner: OwnerDep) -> Response:
    return await run_operation(request, server, owner, name, operation)


async def run_operation(request: Request, server: Server, owner: str, name: str, operation: str) -> Response:
    """Decode, run the operation on the backend, encode: for both entry points."""
    with Counted(server, operation) as counted:
        key = instance_key(owner, name)
        body, media = await read_body(request)
        out_media = response_type(request, media)
        returns = returns_field(body.pop("return", None))
        sequence = body.pop("sequence", None)
        if sequence is not None and not isinstance(sequence, dict):
            raise MalformedBody("sequence: expected a map {every?, last?}")
        max_elements = server.settings.max_tensor_elements
        tensors = tensor_fields(body, "body", media, max_elements)
        result = await server.backend.call(key, operation=operation, tensors=tensors, returns=returns,
                                           idempotency_key=idempotency_key(request),
                                           expected_version=if_match(request), sequence=sequence)
        response = encode(result, out_media)
        counted.status = 200
        server.answered()
        return response


@router.post(PACKED_PATH.removeprefix("/v1"), tags=["operations"],
             summary="Run one operation on many of your instances in one request (all applied, or none)",
             description="Body `{\"calls\": [{\"name\": \"<instance>\", \"tensors\": {…}}, …], \"return\"?: "
                         "[…]}`; answer `{\"results\": [{\"name\", \"version\", …compartments}, …]}` in the "
                         "order of the calls, each equal to a separate call's. Or the stacked form: `{\"names\": "
                         "[…], \"tensors\": {\"inputs\": <(instances, batch, …)>}, \"return\"?: […]}`, answered "
                         "`{\"names\", \"versions\", \"outputs\": <(instances, batch, …)>, …}` (StackedResponse; "
                         "the instances must return one shape). Instances of one kind, config and "
                         "shapes run as one device call. Every check comes before anything is applied: an error "
                         "names the call (`calls[3] ('enc-3'): …`; in the stacked form, names[3]) and nothing "
                         "changed. An `Idempotency-Key` makes a retry return the first answers.",
             openapi_extra={**body_doc(PackedRequest), **one_of_answers(PackedResponse, StackedResponse)},
             responses=responses(None, 400, 404, 409, 413, 415, 422, 507))
async def packed(operation: str, request: Request, server: ServerDep, owner: OwnerDep) -> Response:
    return await run_packed_request(request, server, owner, operation)


async def run_packed_request(request: Request, server: Server, owner: str, operation: str) -> Response:
    """Decode, run the packed call on the backend, encode: for both entry points."""
    with Counted(server, operation) as counted:
        if request.headers.get("if-match") is not None:  # as a frame's if_match is refused on call_many
            raise InvalidFields("If-Match: a packed call runs on many instances, each at its own version; send "
                                "If-Match with a call on one instance")
        body, media = await read_body(request)
        require_fields(body, PackedRequest)
        returns = returns_field(body.get("return"))
        calls, tensors = body.get("calls"), body.get("tensors")
        if media != MSGPACK:  # JSON tensors become arrays here (msgpack's are arrays already)
            max_elements = server.settings.max_tensor_elements
            if isinstance(calls, list):  # bounded before any call is read, as run_packed bounds them
                check_pack_size("calls", calls, most_packed(server))
                body["calls"] = [{**call, "tensors": tensor_fields(call["tensors"], "tensors", media, max_elements)}
                                 if isinstance(call, dict) and isinstance(call.get("tensors"), dict) else call
                                 for call in calls]
            if isinstance(tensors, dict):
                tensors = tensor_fields(tensors, "tensors", media, max_elements)
        answer = await run_packed(server, owner, operation, body, tensors, returns, idempotency_key(request))
        response = encode(answer, response_type(request, media))
        counted.status = 200
        server.answered()
        return response


class OperationRoute(Route):
    """An operation route without FastAPI's routing and injection, for the known operation names only: a single
    call (``PATH``) or a packed one (``PACKED_PATH``)."""

    def __init__(self, documented: Any, operations: frozenset[str]) -> None:
        super().__init__(documented.path, self.serve, methods=["POST"])
        self.documented = documented  # FastAPI's route: metrics label requests by its template
        self.packed = documented.path == PACKED_PATH
        self.pattern = re.compile(r"/v1/packed/(?P<operation>[^/]+)" if self.packed else
                                  r"/v1/synapses/(?P<name>[^/]+)/(?P<operation>[^/]+)")
        self.operations = operations

    def matches(self, scope: Any) -> tuple[Match, dict[str, Any]]:
        if scope["type"] != "http" or scope["method"] != "POST":
            return Match.NONE, {}
        match = self.pattern.fullmatch(scope["path"])
        if match is None or match["operation"] not in self.operations:
            return Match.NONE, {}  # anything else goes on to FastAPI's routes
        return Match.FULL, {"endpoint": self.endpoint, "path_params": match.groupdict(), "route": self.documented}

    async def serve(self, request: Request) -> Response:
        try:
            principal = get_principal(request)
            check_acceptable(request)
            owner = get_owner(principal, request.query_params.get("owner"))
            params, server = request.path_params, request.app.state.server
            if self.packed:
                return await run_packed_request(request, server, owner, params["operation"])
            return await run_operation(request, server, owner, params["name"], params["operation"])
        except SynapseServeError as exc:
            return problem_from(exc, request)
