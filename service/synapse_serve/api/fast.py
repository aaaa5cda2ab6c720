"""The operation fast path: ``POST /v1/synapses/{name}/{operation}`` without FastAPI's routing and injection.

Operations are the calls researchers make in tight loops, and a small synapse's
forward costs less than FastAPI's route matching and dependency solving did.
This middleware recognises the operation route by its shape and runs the very
same handler (``routes.run_operation``) with the very same caller checks
(``get_principal``, ``get_owner``); everything else, and anything it does not
recognise, goes on to FastAPI. The OpenAPI document still describes the route.
"""

from __future__ import annotations

import re

from starlette.requests import Request

from synapse_serve.api.bodies import problem_from
from synapse_serve.api.routes import get_owner, get_principal, run_operation
from synapse_serve.errors import SynapseServeError

# /v1/synapses/<name>/<operation>: one segment each, no percent-escapes (FastAPI handles those)
_OPERATION_PATH = re.compile(r"/v1/synapses/(?P<name>[A-Za-z0-9._-]+)/(?P<operation>[A-Za-z_]+)")
# the other POST routes of that shape
_NOT_OPERATIONS = frozenset({"snapshots"})


class OperationFastPath:
    """ASGI middleware in front of FastAPI's router for the operation route."""

    def __init__(self, app, route) -> None:
        self.app = app
        self.route = route  # FastAPI's route object: metrics label requests by its template

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        match = _OPERATION_PATH.fullmatch(scope["path"])
        if match is None or match["operation"] in _NOT_OPERATIONS:
            return await self.app(scope, receive, send)
        scope["route"] = self.route
        scope["path_params"] = match.groupdict()
        request = Request(scope, receive)
        try:
            principal = get_principal(request)
            owner = get_owner(principal, request.query_params.get("owner"))
            response = await run_operation(request, request.app.state.registry, owner, match["name"],
                                           match["operation"])
        except SynapseServeError as exc:
            response = problem_from(exc, request)
        await response(scope, receive, send)
