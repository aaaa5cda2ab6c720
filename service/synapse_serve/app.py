"""``create_app(settings)``: the FastAPI application. Nothing is built at import time."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import jax
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from synapse_serve.api.bodies import problem, problem_from
from synapse_serve.api.fast import OperationFastPath
from synapse_serve.api.routes import OPERATION_ROUTE, router
from synapse_serve.auth import TokenTable, is_loopback
from synapse_serve.errors import InvalidConfig, SynapseServeError
from synapse_serve.metrics import Metrics, MetricsMiddleware
from synapse_serve.registry import Registry
from synapse_serve.settings import Settings
from synapse_serve.store import Store

log = logging.getLogger("synapse_serve")


def enable_compilation_cache(directory: Path) -> None:
    """JAX's persistent compilation cache in ``directory``, for every program however fast it compiled.

    Process-wide (a JAX setting): a restarted server loads its executables instead of compiling.
    """
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def apply_memory_settings(settings: Settings) -> None:
    """GPU memory behaviour for JAX, unless the environment already says (call before JAX starts a backend)."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "true" if settings.gpu_preallocate else "false")
    if settings.gpu_memory_fraction is not None:
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(settings.gpu_memory_fraction))


def warm_up() -> None:
    """Compile and run one tiny synapse so the first real call does not pay JAX's start-up."""
    registry = Registry()
    registry.create("warmup", "HebbianDeconvSynapse", {"shape": [1, 1, 1, 1], "x_shape": [1, 1]})
    x = np.zeros((1, 1, 1, 1), np.float32)
    registry.call("warmup", "forward", {"inputs": x})
    registry.call("warmup", "evolve", {"pre": x, "post": x})


class RequestIdMiddleware:
    """Gives every request an id (the caller's X-Request-ID, else a new one) and echoes it."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        await self.app(scope, receive, send_with_id)


class UnsafeSettings(ValueError):
    """Settings the server refuses to start with; the message says how to fix them."""


def token_table(settings: Settings) -> TokenTable | None:
    """The tokens, or None when authentication is off; refuses an unprotected public address."""
    enabled = settings.auth == "on" or (settings.auth == "auto" and not is_loopback(settings.host))
    if not enabled:
        if not is_loopback(settings.host) and not settings.allow_public_without_auth:
            raise UnsafeSettings(
                f"refusing to serve {settings.host} with auth off: anyone who can reach it could read and change "
                "every instance. Set tokens (SYNAPSE_TOKENS or SYNAPSE_TOKENS_FILE) and SYNAPSE_AUTH=auto, or, "
                "only behind a trusted authenticating proxy, SYNAPSE_ALLOW_PUBLIC_WITHOUT_AUTH=true")
        return None
    try:
        table = TokenTable.load(settings.tokens, settings.tokens_file)
    except (InvalidConfig, OSError) as exc:
        raise UnsafeSettings(f"cannot load tokens: {getattr(exc, 'detail', exc)}") from None
    if not len(table):
        raise UnsafeSettings(
            f"authentication is on (listening on {settings.host}) but no tokens are configured: set "
            "SYNAPSE_TOKENS='owner:<long random token>' or SYNAPSE_TOKENS_FILE")
    return table


def create_app(settings: Settings | None = None) -> FastAPI:
    """The application, with its registry built in the lifespan."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.compilation_cache:
            enable_compilation_cache(settings.state_dir / "jax-cache")
        registry = Registry(max_instances=settings.max_instances, store=Store(settings.state_dir),
                            durability=settings.durability, max_instances_per_owner=settings.max_instances_per_owner,
                            max_state_bytes_per_owner=settings.max_state_bytes_per_owner,
                            max_batch=settings.max_batch, worker_threads=settings.worker_threads,
                            inline_max_s=settings.inline_call_us * 1e-6,
                            device_budget_bytes=settings.device_budget_bytes)
        app.state.registry = registry

        async def get_ready() -> None:  # in the background: /healthz answers while this runs
            app.state.phase = "restoring instances"
            await run_in_threadpool(registry.restore)  # a failure here is a bug: let it stop readiness
            app.state.phase = "warming up"
            try:
                if settings.warmup:
                    await run_in_threadpool(warm_up)
            except Exception:  # a failed warm-up costs the first caller a compile, nothing else
                log.exception("warm-up failed; serving without it")
            registry.start_flusher(settings.flush_interval_s)
            if settings.evict_idle_after_s > 0:
                registry.start_evictor(settings.evict_idle_after_s)
            app.state.phase = "ready"
            app.state.ready.set()

        task = asyncio.create_task(get_ready())
        yield
        task.cancel()
        await run_in_threadpool(registry.close)  # graceful shutdown: write what changed

    app = FastAPI(
        title="synapse-serve",
        version="0.1.0",
        summary="Learnable synapses (ngclearn's HebbianDeconvSynapse) as a REST service.",
        description="Bodies are msgpack (`application/msgpack`, primary) or JSON (`application/json`); "
                    "tensors follow docs/wire-format.md. Errors are RFC 9457 problem details.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.tokens = token_table(settings)
    app.state.ready = threading.Event()
    app.state.phase = "starting"
    app.state.metrics = Metrics()
    app.include_router(router)
    app.add_middleware(OperationFastPath, route=OPERATION_ROUTE)  # innermost: inside metrics and request ids
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(RequestIdMiddleware)

    @app.exception_handler(SynapseServeError)
    async def domain_error(request: Request, exc: SynapseServeError):
        return problem_from(exc, request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        return problem(exc.status_code, str(exc.detail), f"{request.method} {request.url.path}: {exc.detail}",
                       slug, request)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())[:500]
        return problem(422, "Invalid request", detail, "invalid-request", request)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return problem(500, "Internal error", "an unexpected error occurred; the request id is in the logs",
                       "internal-error", request)

    return app
