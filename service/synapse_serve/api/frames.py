"""Frames: the REST API's requests as msgpack maps, for the session stream and the in-process client.

A frame is ``{"id": …, "op": "<op>", …fields}``; its answer is ``{"status": 200, "result": …}`` or
``{"status": 4xx/5xx, "problem": {type, title, status, detail, request_id, …}}`` where ``result``
is exactly the body the REST route answers with (``None`` where REST answers 204). Every op
calls the same backend method as its REST route, with the same checks, so the semantics,
errors, limits and owner isolation are the REST API's (docs/api.md#frames lists the ops).

Two transports run frames: ``api/session.py`` (a WebSocket, ``/v1/session``) and the client's
in-process mode (``SynapseClient("local")``), which calls ``run_frame`` in the caller's process.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from synapse_serve.api.bodies import (
    PROBLEM_BASE,
    check_tensor_count,
    compartment_ref,
    init_tensors,
    map_field,
    require_fields,
    returns_field,
)
from synapse_serve.api.insight import draw
from synapse_serve.api.schemas import CreateRequest, SnapshotRequest
from synapse_serve.api.server import Server, instance_key, owner_for
from synapse_serve.auth import Principal
from synapse_serve.errors import InvalidFields, InvalidRequest, MalformedBody, NotReady, SynapseServeError
from synapse_serve.names import CompartmentRef, InstanceKey

log = logging.getLogger("synapse_serve")


@dataclasses.dataclass(frozen=True)
class FrameOp:
    """One op: the fields a frame of it must and may carry (besides id, op and owner) and what it does."""

    required: frozenset[str]
    optional: frozenset[str]
    run: Callable[[Server, Principal, dict[str, Any]], Awaitable[Any]]


def _key(principal: Principal, frame: dict[str, Any]) -> InstanceKey:
    return instance_key(owner_for(principal, frame.get("owner")), _text(frame, "name"))


def _owner(principal: Principal, frame: dict[str, Any]) -> str:
    return owner_for(principal, frame.get("owner"))


def _text(frame: dict[str, Any], field: str) -> str:
    value = frame[field]
    if not isinstance(value, str):
        raise MalformedBody(f"{field}: expected a string, received {type(value).__name__}")
    return value


def _tensor(field: str, value: Any) -> Any:
    if isinstance(value, dict) and "ref" in value:
        return compartment_ref(field, value)
    if isinstance(value, CompartmentRef):  # already parsed (a JSON body's): the call's own checks answer for it
        return value
    if value is not None and not hasattr(value, "dtype"):
        raise MalformedBody(f"{field}: expected a tensor map {{dtype, shape, data}}, received {type(value).__name__}")
    return value


def _tensors(frame: dict[str, Any]) -> dict[str, Any]:
    tensors = map_field(frame.get("tensors"), "tensors (a map of tensors)")
    check_tensor_count(tensors, "tensors")
    return {str(name): _tensor(str(name), value) for name, value in tensors.items()}


def _returns(frame: dict[str, Any]) -> list[str] | None:
    return returns_field(frame.get("return"))


def _idempotency_key(frame: dict[str, Any]) -> str | None:
    value = frame.get("idempotency_key")
    if value is not None and not (isinstance(value, str) and 1 <= len(value) <= 255 and value.isascii()
                                  and value.isprintable()):
        raise MalformedBody("idempotency_key: use 1 to 255 printable ASCII characters (a UUID is ideal)")
    return value


def _if_match(frame: dict[str, Any]) -> int | None:
    value = frame.get("if_match")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 10 ** 18):
        # (REST's If-Match takes at most 18 digits: the same versions on both)
        raise MalformedBody(f"if_match: expected a version number, received {str(value)[:40]!r}")
    return value


def _sequence(frame: dict[str, Any]) -> dict[str, Any] | None:
    value = frame.get("sequence")
    if value is not None and not isinstance(value, dict):
        raise MalformedBody("sequence: expected a map {every?, last?}")
    return value


# --- the ops ---


async def _call(server: Server, principal: Principal, frame: dict[str, Any]) -> Any:
    return await server.backend.call(_key(principal, frame), operation=_text(frame, "operation"),
                                      tensors=_tensors(frame), returns=_returns(frame),
                                      idempotency_key=_idempotency_key(frame), expected_version=_if_match(frame),
                                      sequence=_sequence(frame))


async def _call_many(server: Server, principal: Principal, frame: dict[str, Any]) -> Any:
    return await run_packed(server, _owner(principal, frame), _text(frame, "operation"), frame, frame.get("tensors"),
                            _returns(frame), _idempotency_key(frame))


async def run_packed(server: Server, owner: str, operation: str, body: dict[str, Any], tensors: Any,
                     returns: list[str] | None, idempotency_key: str | None) -> dict[str, Any]:
    """A packed call's answer (REST and frames): ``calls`` answers ``{"results": […]}``; the stacked form (``names``
    and ``tensors``, each tensor (instances, batch, …)) answers ``{"names", "versions", <compartment>: stacked}``."""
    stacked_form = "names" in body or "tensors" in body
    if ("calls" in body) == stacked_form or (stacked_form and not ("names" in body and "tensors" in body)):
        raise InvalidFields('give calls ([{"name", "tensors"}, …]), or names and tensors (the stacked form)')
    if "calls" in body:
        keys, per_call = packed_calls(body["calls"], owner, most_packed(server))
        answers = await server.backend.call_many(keys, operation=operation, tensors=per_call, returns=returns,
                                                 idempotency_key=idempotency_key)
        return {"results": [{"name": key.name, **answer} for key, answer in zip(keys, answers)]}
    names = body["names"]
    if isinstance(names, list):
        check_pack_size("names", names, most_packed(server))
    if not isinstance(names, list) or not names or not all(isinstance(name, str) for name in names):
        raise MalformedBody("names: expected a non-empty list of instance names")
    if not isinstance(tensors, dict):  # empty: an operation that takes none, or reads its own (a reset)
        raise MalformedBody("tensors: expected a map of stacked tensors (instances, batch, …)")
    check_tensor_count(tensors, "tensors")
    stacked = {str(name): _tensor(str(name), value) for name, value in tensors.items()}
    refs = [name for name, value in stacked.items() if isinstance(value, CompartmentRef)]
    if refs:
        raise InvalidRequest(f"{refs[0]}: a stacked call takes tensors, not references", argument=refs[0])
    keys = [instance_key(owner, name) for name in names]
    answer = await server.backend.call_stacked(keys, operation=operation, tensors=stacked, returns=returns,
                                               idempotency_key=idempotency_key)
    return {"names": list(names), **answer}


def most_packed(server: Server) -> int:
    """The most instances one packed call may name: all of one owner's (a call names only the caller's)."""
    return min(server.settings.max_instances, server.settings.max_instances_per_owner)


def check_pack_size(field: str, items: list, most: int) -> None:
    """Refused before any name is read: the names are checked, and each waits its turn on the event loop, one by
    one (a red-team frame of 65,000 names held the loop 0.8 s before the registry refused it)."""
    if len(items) > most:
        raise InvalidRequest(f"{field}: {len(items)} instances, more than the {most} one owner can hold",
                             argument=field)


def packed_calls(calls: Any, owner: str, most: int) -> tuple[list[InstanceKey], list[dict[str, Any]]]:
    """A packed call's ``[{"name", "tensors"}, …]`` as instance keys and tensor maps (REST and frames), at most
    ``most`` of them."""
    if not isinstance(calls, list) or not calls:
        raise MalformedBody('calls: expected a non-empty list of {"name": …, "tensors": {…}}')
    check_pack_size("calls", calls, most)
    keys, tensors = [], []
    for index, call in enumerate(calls):
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or call.keys() - {"name", "tensors"}:
            raise MalformedBody(f'calls[{index}]: expected {{"name": "<instance>", "tensors": {{…}}}}')
        keys.append(instance_key(owner, call["name"]))
        tensors.append(_tensors(call))
        if any(isinstance(value, CompartmentRef) for value in tensors[-1].values()):  # before each instance it
            # names waits its turn on the event loop (a red-team run: 1,000 calls of 16 references, ~0.2 s)
            raise InvalidRequest(f"calls[{index}] ({call['name'][:64]!r}): a packed call takes tensors, not references",
                                 argument="calls")
    return keys, tensors


async def _read(server: Server, principal: Principal, frame: dict[str, Any]) -> Any:
    compartment = _text(frame, "compartment")
    value, version = await server.backend.read(_key(principal, frame), compartment=compartment)
    return {"name": compartment, "value": value, "version": version}


async def _write(server: Server, principal: Principal, frame: dict[str, Any]) -> Any:
    value = frame["value"]
    if not hasattr(value, "dtype"):
        raise MalformedBody("value: expected a tensor, not a reference")
    version = await server.backend.write(_key(principal, frame), compartment=_text(frame, "compartment"),
                                         value=value, expected_version=_if_match(frame))
    return {"version": version}


async def _describe(server: Server, principal: Principal, frame: dict[str, Any]) -> Any:
    return await server.backend.describe(_key(principal, frame))


async def _help(server: Server, principal: Principal, frame: dict[str, Any]) -> Any:
    return await server.backend.help(_key(principal, frame))


async def _create(server: Server, principal: Principal, frame: dict[str, Any]) -> Any:
    body = frame["body"]
    if not isinstance(body, dict):
        raise MalformedBody(f"body: expected a map, received {type(body).__name__}")
    require_fields(body, CreateRequest)
    init = map_field(body.get("init"), "init (a map of tensors: weights, biases)")
    init = init_tensors({str(k): _tensor(str(k), v) for k, v in init.items()})
    key = instance_key(_owner(principal, frame), body["name"])
    return await server.backend.create(key, kind=body["kind"], config=body["config"], init=init,
                                       seed=body.get("seed", 0), durability=body.get("durability"),
                                       device=body.get("device"))


async def _list(server: Server, principal: Principal, frame: dict[str, Any]) -> Any:
    everyone = principal.admin and frame.get("owner") is None
    return {"synapses": await server.backend.list(owner=None if everyone else _owner(principal, frame))}


async def _delete(server: Server, principal: Principal, frame: dict[str, Any]) -> Any:
    await server.backend.delete(_key(principal, frame), expected_version=_if_match(frame))


async def _export(server: Server, principal: Principal, frame: dict[str, Any]) -> Any:
    """The file as one bytes value (a frame's answer is one message), joined off the event loop."""
    _, parts = await server.backend.export(_key(principal, frame))
    if getattr(server.backend, "in_caller_thread", False):
        return b"".join(parts())
    return await server.threads.run(principal.owner, lambda: b"".join(parts()))


async def _import(server: Server, principal: Principal, frame: dict[str, Any]) -> Any:
    blob = frame["blob"]
    if not isinstance(blob, (bytes, bytearray, memoryview)) or not blob:
        raise MalformedBody("blob: expected the bytes of an exported file")
    return await server.backend.import_(_key(principal, frame), blob=bytes(blob))


async def _snapshot(server: Server, principal: Principal, frame: dict[str, Any]) -> Any:
    body = {"snapshot": frame["snapshot"]}
    require_fields(body, SnapshotRequest)
    return await server.backend.snapshot(_key(principal, frame), snapshot=_text(frame, "snapshot"))


async def _snapshots(server: Server, principal: Principal, frame: dict[str, Any]) -> Any:
    return {"snapshots": await server.backend.snapshots(_key(principal, frame))}


async def _rollback(server: Server, principal: Principal, frame: dict[str, Any]) -> Any:
    version = await server.backend.rollback(_key(principal, frame), snapshot=_text(frame, "snapshot"),
                                            expected_version=_if_match(frame))
    return {"version": version}


async def _delete_snapshot(server: Server, principal: Principal, frame: dict[str, Any]) -> Any:
    await server.backend.delete_snapshot(_key(principal, frame), snapshot=_text(frame, "snapshot"))


async def _evicted(server: Server, principal: Principal, frame: dict[str, Any]) -> Any:
    return {"evicted": await server.backend.evicted(owner=_owner(principal, frame))}


async def _unevict(server: Server, principal: Principal, frame: dict[str, Any]) -> Any:
    return await server.backend.unevict(_key(principal, frame))


async def _discard_evicted(server: Server, principal: Principal, frame: dict[str, Any]) -> Any:
    await server.backend.discard_evicted(_key(principal, frame))


async def _stats(server: Server, principal: Principal, frame: dict[str, Any]) -> Any:
    return await server.backend.stats(_key(principal, frame))


async def _history(server: Server, principal: Principal, frame: dict[str, Any]) -> Any:
    return await server.backend.history(_key(principal, frame))


async def _filters(server: Server, principal: Principal, frame: dict[str, Any]) -> Any:
    picture = await draw(server, _key(principal, frame), map_field(frame.get("options"), "options"))
    return {"png": picture.png, "layout": picture.headers()}


async def _kinds(server: Server, principal: Principal, frame: dict[str, Any]) -> Any:
    return {"kinds": server.backend.kinds()}


async def _kind_help(server: Server, principal: Principal, frame: dict[str, Any]) -> Any:
    return server.backend.kind_help(_text(frame, "kind"))


def _op(required: str, optional: str, run: Callable[..., Awaitable[Any]]) -> FrameOp:
    return FrameOp(frozenset(required.split()), frozenset(optional.split()) | {"owner"}, run)


OPS: dict[str, FrameOp] = {
    "call": _op("name operation", "tensors return idempotency_key if_match sequence", _call),
    "call_many": _op("operation", "calls names tensors return idempotency_key", _call_many),
    "read": _op("name compartment", "", _read),
    "write": _op("name compartment value", "if_match", _write),
    "describe": _op("name", "", _describe),
    "help": _op("name", "", _help),
    "create": _op("body", "", _create),
    "list": _op("", "", _list),
    "delete": _op("name", "if_match", _delete),
    "export": _op("name", "", _export),
    "import": _op("name blob", "", _import),
    "snapshot": _op("name snapshot", "", _snapshot),
    "snapshots": _op("name", "", _snapshots),
    "rollback": _op("name snapshot", "if_match", _rollback),
    "delete_snapshot": _op("name snapshot", "", _delete_snapshot),
    "evicted": _op("", "", _evicted),
    "unevict": _op("name", "", _unevict),
    "discard_evicted": _op("name", "", _discard_evicted),
    "stats": _op("name", "", _stats),
    "history": _op("name", "", _history),
    "filters": _op("name", "options", _filters),
    "kinds": _op("", "", _kinds),
    "kind_help": _op("kind", "", _kind_help),
}


async def run_frame(server: Server, principal: Principal, frame: dict[str, Any], request_id: str) -> dict[str, Any]:
    """One frame's answer, never an exception for a domain error: ``{"status", "result"}`` or
    ``{"status", "problem"}``. Operation calls are counted in the metrics as REST's are."""
    op, begun = frame.get("op"), time.perf_counter()
    try:
        spec = OPS.get(op) if isinstance(op, str) else None
        if spec is None:
            raise InvalidFields(f"op: {str(op)[:40]!r} is not one of {', '.join(OPS)}")
        fields = frame.keys() - {"id", "op"}
        missing, unknown = spec.required - fields, fields - spec.required - spec.optional
        if missing or unknown:
            raise InvalidFields(f"a {op} frame lacks {', '.join(sorted(missing))}" if missing else
                                f"a {op} frame has unknown fields {', '.join(sorted(map(str, unknown)))[:200]}; it "
                                f"takes {', '.join(sorted(spec.required | spec.optional))}")
        answer = {"status": 200, "result": await spec.run(server, principal, frame)}
    except SynapseServeError as exc:
        if exc.status >= 500 and not isinstance(exc, NotReady):
            log.error("frame %s (%s): %s", request_id, str(op)[:40], exc.detail)
        answer = {"status": exc.status, "problem": problem_of(exc, request_id)}
    except Exception:  # our bug: answered as a 500 with the id, the stream goes on
        log.exception("unexpected error on frame %s (%s)", request_id, str(op)[:40])
        answer = {"status": 500, "problem": internal_problem(request_id)}
    if isinstance(op, str) and op in ("call", "call_many"):  # an op may be anything msgpack holds (a tensor too)
        try:  # counting never costs the frame its answer (nor the stream its connection)
            server.count_operation(frame.get("operation"), answer["status"], time.perf_counter() - begun)
        except Exception:
            log.exception("frame %s: not counted in the metrics", request_id)
    return answer


def internal_problem(request_id: str) -> dict[str, Any]:
    """The problem document of our own bug (a 500), naming the request to look up in the log."""
    return {"type": PROBLEM_BASE + "internal-error", "title": "Internal error", "status": 500,
            "request_id": request_id, "detail": f"an unexpected error occurred; request id {request_id}"}


def problem_of(exc: SynapseServeError, request_id: str) -> dict[str, Any]:
    """The RFC 9457 problem document of a domain error, as REST's problem bodies carry it."""
    body = {"type": PROBLEM_BASE + exc.slug, "title": exc.title, "status": exc.status, "detail": exc.detail,
            "request_id": request_id}
    for key, value in exc.extra.items():
        body.setdefault(key, value)
    return body
