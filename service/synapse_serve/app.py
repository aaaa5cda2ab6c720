"""``create_app(settings)``: the FastAPI application. Nothing is built at import time."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from synapse_serve import __version__
from synapse_serve.api import admin, health, insight, kinds, operations, session, snapshots, synapses, ui
from synapse_serve.api.bodies import problem, problem_from
from synapse_serve.api.operations import OperationRoute
from synapse_serve.api.polling import BusyPoll
from synapse_serve.api.schemas import add_request_schemas
from synapse_serve.api.server import Server
from synapse_serve.auth import UnsafeSettings, auth_mode, token_table
from synapse_serve.backend import Backend
from synapse_serve.errors import SynapseServeError
from synapse_serve.metrics import Metrics, MetricsMiddleware
from synapse_serve.protocol import connection_bound, descriptor_limit, protocol_for
from synapse_serve.settings import Settings
from synapse_serve.wsprotocol import SessionWebSocketProtocol

log = logging.getLogger("synapse_serve")
_REQUEST_ID = re.compile(r"[!-~]{1,128}")  # visible ASCII: safe in a header and in a log line

__all__ = ["UnsafeSettings", "create_app", "make_backend", "uvicorn_options"]


def uvicorn_options(settings: Settings) -> dict:
    """How uvicorn must run the app: one worker, each request's head and the open connections bounded, and the
    session stream's frame limit."""
    connections = connection_bound(settings.max_connections, descriptor_limit())
    return {"http": protocol_for(settings.head_timeout_s, settings.body_timeout_s, settings.body_idle_timeout_s,
                                  connections),
            "ws": SessionWebSocketProtocol, "ws_max_size": settings.max_body_bytes,  # websockets-sansio, bounded
            "ws_ping_interval": 20.0, "ws_ping_timeout": 20.0,
            # no compression: a frame at the size limit (256 MiB) would arrive as ~256 KB of deflated bytes (a red-team
            # run); tensors hardly compress, and the Python client never asks for it
            "ws_per_message_deflate": False}


def make_backend(settings: Settings) -> Backend:
    """The backend the settings ask for: this process's JAX devices, or shard actors on a Ray cluster."""
    if settings.backend == "ray":
        from synapse_serve.cluster.backend import RayBackend  # no JAX in this process: the shards have it

        return RayBackend(settings)
    from synapse_serve.local.backend import LocalBackend  # JAX is imported here, not by the API

    return LocalBackend(settings)


class RequestContextMiddleware:
    """Gives every request an id and answers any unexpected failure with a 500 problem.

    The id is the caller's ``X-Request-ID`` when it is 1-128 visible ASCII characters, else a new
    one; it is echoed in the header, in problem bodies and in the access log. An exception that
    escapes everything else is logged and answered here (with the id, keeping the connection),
    never as a bare stack trace.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = message.get("headers", [])
                # no answer is sniffed into HTML, whatever it echoes (a problem naming what was sent)
                sniff = [] if any(name.lower() == b"x-content-type-options" for name, _ in headers) else _NOSNIFF
                message["headers"] = [*headers, (b"x-request-id", request_id.encode("latin-1")), *sniff]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unexpected error on %s %s (request %s)", scope["method"], scope["path"], request_id)
            if started:
                raise  # the answer is half sent: only closing the connection tells the client
            response = problem(500, "Internal error", f"an unexpected error occurred; request id {request_id}",
                               "internal-error", Request(scope))
            await response(scope, receive, send_with_id)


_NOSNIFF = [(b"x-content-type-options", b"nosniff")]


def create_app(settings: Settings | None = None, backend: Backend | None = None) -> FastAPI:
    """The application; the backend takes its state in the lifespan, and gets ready in the background."""
    settings = settings or Settings()
    tokens = token_table(settings)  # UnsafeSettings: refused before anything starts
    backend = backend or make_backend(settings)
    server = Server(settings=settings, backend=backend, tokens=tokens, metrics=Metrics(),
                    poll=BusyPoll(settings.busy_poll_us * 1e-6, backend.busy))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await backend.start()  # StateDirLocked: a second server on the same directory does not start
        setup = backend.describe_setup()
        log.info("synapse-serve at http://%s:%s (docs at /docs): auth %s; devices %s; state directory %s; "
                 "durability %s", settings.host, settings.port, auth_mode(settings, tokens),
                 ", ".join(setup["devices"]), setup["state_dir"], setup["durability"])

        async def get_ready() -> None:  # in the background: /healthz answers while this runs
            await backend.get_ready(server.set_phase)  # a failure here is a bug: let it stop readiness
            server.set_phase("ready")
            server.ready.set()

        task = asyncio.create_task(get_ready())
        try:
            yield
        finally:
            task.cancel()
            await server.poll.close()
            await backend.close()  # graceful shutdown: write what changed
            server.threads.close()

    app = FastAPI(
        title="synapse-serve",
        version=__version__,
        summary="Learnable synapses (ngclearn's synapses) as a REST service.",
        description="Bodies are msgpack (`application/msgpack`, primary) or JSON (`application/json`); "
                    "tensors follow docs/wire-format.md. Errors are RFC 9457 problem details.",
        lifespan=lifespan,
        docs_url=None,  # /docs and /redoc come from api/ui.py, with their assets served from the package
        redoc_url=None,
    )
    app.state.server = server
    fastapi_openapi = app.openapi

    def openapi() -> dict:
        return add_request_schemas(fastapi_openapi())  # FastAPI caches the document: this completes it once

    app.openapi = openapi
    for router in (health.router, kinds.router, synapses.router, insight.router, insight.pictures, snapshots.router,
                   admin.router, session.router, operations.router, ui.router):
        app.include_router(router)
    if settings.operation_route:
        for path in (operations.PATH, operations.PACKED_PATH):
            documented = next(r for r in operations.router.routes if r.path == path)
            app.router.routes.insert(0, OperationRoute(documented, backend.operation_names()))
    app.add_middleware(MetricsMiddleware, metrics=server.metrics, access_log=settings.access_log)
    app.add_middleware(RequestContextMiddleware)

    @app.exception_handler(SynapseServeError)
    async def domain_error(request: Request, exc: SynapseServeError):
        return problem_from(exc, request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        title, slug = {404: ("Not found", "not-found"), 405: ("Method not allowed", "method-not-allowed")}.get(
            exc.status_code, (str(exc.detail), "http-error"))  # the API's titles, not the framework's spelling
        return problem(exc.status_code, title, f"{request.method} {request.url.path}: {exc.detail}", slug, request,
                       headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())[:500]
        return problem(422, "Invalid request", detail, "invalid-request", request)

    return app

