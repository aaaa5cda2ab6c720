"""The server object every route reaches through one dependency, and the caller checks (auth, owner, Accept)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Query, Request

from synapse_serve.api.polling import BusyPoll
from synapse_serve.auth import LOCAL, Principal, TokenTable
from synapse_serve.backend import Backend
from synapse_serve.errors import NotFound, SynapseServeError, Unauthorized
from synapse_serve.metrics import Metrics
from synapse_serve.names import InstanceKey, validate_owner
from synapse_serve.settings import Settings
from synapse_serve.shares import SharedThreads


@dataclass
class Server:
    """What a running server is made of: its settings, backend, tokens, metrics and readiness."""

    settings: Settings
    backend: Backend
    tokens: TokenTable | None  # None: authentication is off
    metrics: Metrics | None  # None: nothing could read them (the in-process engine serves no /metrics)
    phase: str = "starting"
    ready: threading.Event = field(default_factory=threading.Event)
    poll: BusyPoll | None = None  # the event loop's busy polling after answers (None: no sockets, in-process)
    # JSON texts of tensors and pictures: CPU work beside the calls, each caller with a share of these threads
    threads: SharedThreads = field(default_factory=SharedThreads)

    def set_phase(self, phase: str) -> None:
        self.phase = phase

    def answered(self) -> None:
        """An answer to a session frame or an operation request is going out: keep the loop polling for the next
        request a moment (api/polling.py)."""
        if self.poll is not None:
            self.poll.kick()

    def count_operation(self, operation: Any, status: int, seconds: float) -> None:
        """An operation call in the metrics, by operation (names the server does not know: ``unknown``; a frame's
        ``operation`` may be anything msgpack holds, a list or a map too)."""
        if self.metrics is None:
            return
        label = operation if isinstance(operation, str) and operation in self.backend.operation_names() else "unknown"
        self.metrics.observe_operation(label, status, seconds)


class Counted:
    """Counts one operation call of a route in the metrics with its status (500 unless it answered, a domain
    error's own) and duration, however it ends."""

    __slots__ = ("server", "operation", "started", "status")

    def __init__(self, server: Server, operation: str) -> None:
        self.server, self.operation, self.started, self.status = server, operation, time.perf_counter(), 500

    def __enter__(self) -> Counted:
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, SynapseServeError):
            self.status = exc.status
        self.server.count_operation(self.operation, self.status, time.perf_counter() - self.started)


def get_server(request: Request) -> Server:
    return request.app.state.server


ServerDep = Annotated[Server, Depends(get_server)]


def principal_of(tokens: TokenTable | None, authorization: str) -> Principal:
    """The caller named by an ``Authorization`` header value; everyone is the local admin when auth is off."""
    if tokens is None:
        return LOCAL
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("this server needs a bearer token: send Authorization: Bearer <token>")
    principal = tokens.authenticate(token.strip())
    if principal is None:
        raise Unauthorized("the bearer token is not valid")
    return principal


def get_principal(request: Request) -> Principal:
    """The caller, from ``Authorization: Bearer <token>`` (a dependency of every /v1 route)."""
    principal = principal_of(request.app.state.server.tokens, request.headers.get("authorization", ""))
    request.state.owner = principal.owner  # for the access log
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def get_owner(principal: PrincipalDep,
              owner: Annotated[str | None, Query(description="admin only: act on this owner's instances")] = None
              ) -> str:
    """Whose instances a call addresses: the caller's own, or (admins only) the named owner's."""
    return owner_for(principal, owner)


def owner_for(principal: Principal, owner: str | None) -> str:
    """The owner a call of ``principal`` addresses when it names ``owner`` (404 for a non-admin naming another)."""
    if owner is None:
        return principal.owner
    if not isinstance(owner, str):  # a frame's field may hold anything: a tensor compared with a name is no answer
        validate_owner(owner)  # (422: no name at all, nobody's)
    if owner == principal.owner:
        return principal.owner
    if not principal.admin:  # as if nothing were there: names of other owners do not leak
        raise NotFound("no such instance")
    return validate_owner(owner)  # a listing of a malformed owner is a 422, as a call on one is


OwnerDep = Annotated[str, Depends(get_owner)]


def instance_key(owner: str, name: str) -> InstanceKey:
    """The key of an owner's instance (InvalidName for a name that breaks the rule)."""
    return InstanceKey.of(owner, name)


def require_admin(principal: Principal) -> None:
    if not principal.admin:  # as if it were not there
        raise NotFound("no such resource")
