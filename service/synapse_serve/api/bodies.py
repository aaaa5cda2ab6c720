"""Content negotiation: msgpack (primary) and JSON bodies, size and time limits, problem responses."""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from synapse_client._codec import (
    TooManyValues,
    WireError,
    iter_json_parts,
    json_containers,
    json_parts,
    json_tensor,
    packb_parts,
    unpackb,
)
from synapse_serve.errors import (
    BodyTooLarge,
    ClientGone,
    InvalidFields,
    InvalidRequest,
    MalformedBody,
    NotAcceptable,
    NotReady,
    RequestTimeout,
    SynapseServeError,
    UnsupportedMediaType,
)
from synapse_serve.names import CompartmentRef, validate_name

MSGPACK = "application/msgpack"
JSON = "application/json"
PROBLEM = "application/problem+json"
OCTET = "application/octet-stream"
PROBLEM_BASE = "https://synapse-serve.dev/problems/"
_MSGPACK_ALIASES = {MSGPACK, "application/x-msgpack", "application/vnd.msgpack"}
log = logging.getLogger("synapse_serve")


def _media_type(header: str | None) -> str:
    return (header or "").split(";", 1)[0].strip().lower()


async def read_body(request: Request) -> tuple[dict[str, Any], str]:
    """The decoded body (tensors as numpy) and its media type; an empty body is ``{}``.

    The size limit is enforced from Content-Length, and again while streaming, so an
    oversized body is refused before it is read whole; a body that does not arrive in
    time is a 408.
    """
    settings = request.app.state.server.settings
    raw = await _read_limited(request)
    media = _media_type(request.headers.get("content-type"))
    if not raw:
        return {}, media or JSON
    if media in _MSGPACK_ALIASES:
        try:
            body = unpackb(raw, max_elements=settings.max_tensor_elements, max_values=settings.max_body_values)
        except TooManyValues as exc:
            raise too_many_values(exc, settings.max_body_values) from None
        except WireError as exc:
            raise MalformedBody(str(exc)) from None
        kind = MSGPACK
    elif media == JSON or media.endswith("+json"):
        if len(raw) > settings.max_json_body_bytes:  # its reading holds the GIL (and so the event loop) throughout
            raise BodyTooLarge(f"a JSON body of {len(raw)} bytes is over the limit of {settings.max_json_body_bytes} "
                               f"bytes (max_json_body_bytes); send large tensors in msgpack", limit="max_json_body_bytes")
        if json_containers(raw) > settings.max_body_values:  # counted at C speed before any is built
            raise too_many_values(TooManyValues(f"the body holds more than {settings.max_body_values} JSON arrays "
                                                "and objects; send a tensor's values flat with its shape "
                                                "({dtype, shape, values}), or msgpack"), settings.max_body_values)
        try:
            if len(raw) > JSON_ON_LOOP_BYTES:  # ~30 ms a megabyte to read, tensors made arrays: on a worker
                body = await request.app.state.server.threads.run(
                    caller_of(request.scope), _json_body, raw, settings.max_tensor_elements)
            else:
                body = _json_body(raw, settings.max_tensor_elements)
        except (ValueError, RecursionError) as exc:
            raise MalformedBody(f"body is not valid JSON: {str(exc)[:200]}") from None
        kind = JSON
    else:
        raise UnsupportedMediaType(
            f"content type {media or '(none)'!r} is not supported; send {MSGPACK} or {JSON}"
        )
    if not isinstance(body, dict):
        raise MalformedBody(f"the body must be a map/object, received {type(body).__name__}")
    return body, kind


JSON_ON_LOOP_BYTES = 1 << 18


def too_many_values(exc: TooManyValues, limit: int) -> BodyTooLarge:
    """The 413 of a body or frame holding more values than ``SYNAPSE_MAX_BODY_VALUES``."""
    return BodyTooLarge(f"{exc} (max_body_values: {limit})", limit="max_body_values")


class JsonTensor(dict):
    """A ``{"dtype", "shape", "values"}`` object of a JSON body, as read (a map to whatever reads it as one), with
    its values already made an array where they make one (``array``; None where they do not: ``tensor_field`` then
    says what is wrong, naming the field)."""

    array: np.ndarray | None = None


def _json_body(raw: bytes, max_elements: int) -> Any:
    """A JSON body, its tensor objects read as arrays too (``JsonTensor``)."""

    def tensor(obj: dict[str, Any]) -> dict[str, Any]:
        if obj.keys() != {"dtype", "shape", "values"}:
            return obj
        found = JsonTensor(obj)
        try:
            found.array = json_tensor(obj, max_elements)
        except WireError:
            pass
        return found

    return json.loads(raw, object_hook=tensor)


async def _read_limited(request: Request) -> bytes:
    settings = request.app.state.server.settings
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"body of {declared} bytes is over the limit of {limit} bytes")
    chunks, total = [], 0
    deadline = time.monotonic() + settings.body_timeout_s
    stream = request.stream().__aiter__()
    while True:
        wait = min(settings.body_idle_timeout_s, deadline - time.monotonic())
        try:
            if wait <= 0:
                raise TimeoutError
            chunk = await asyncio.wait_for(stream.__anext__(), wait)
        except StopAsyncIteration:
            break
        except ClientDisconnect:  # a 4xx (one no one reads), not an unexpected error logged with its traceback
            raise ClientGone(f"the client went away after {total} bytes of its body") from None
        except TimeoutError:
            raise RequestTimeout(
                f"the body did not arrive in time ({total} bytes after the limit of {settings.body_timeout_s:g} s "
                f"in all, or {settings.body_idle_timeout_s:g} s without a byte); send it whole, or raise "
                "SYNAPSE_BODY_TIMEOUT_S") from None
        total += len(chunk)
        if total > limit:
            raise BodyTooLarge(f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_raw(request: Request, media_type: str) -> bytes:
    """A non-empty body of exactly ``media_type``, size- and time-limited like every body."""
    media = _media_type(request.headers.get("content-type"))
    if media != media_type:
        raise UnsupportedMediaType(f"content type {media or '(none)'!r} is not supported here; send {media_type}")
    raw = await _read_limited(request)
    if not raw:
        raise MalformedBody("the body is empty")
    return raw


def require_fields(body: dict[str, Any], model: type[BaseModel]) -> None:
    """The body has the model's required fields and no others (422 naming them): the model states them once."""
    required, allowed = _fields(model)
    missing, unknown = required - body.keys(), body.keys() - allowed
    if missing or unknown:
        named = heapq.nsmallest(8, (str(u)[:64] for u in unknown))  # a JSON body's keys are bounded by no count
        parts = ([f"missing {', '.join(sorted(missing))}"] if missing else []) + (
            [f"unknown {', '.join(named)}{', …' if len(unknown) > 8 else ''}"] if unknown else [])
        raise InvalidFields(f"body: {'; '.join(parts)}; fields are {', '.join(sorted(allowed))}")


_FIELDS: dict[type, tuple[frozenset[str], frozenset[str]]] = {}


def _fields(model: type[BaseModel]) -> tuple[frozenset[str], frozenset[str]]:
    if model not in _FIELDS:
        names = {name: field.alias or name for name, field in model.model_fields.items()}
        required = frozenset(names[n] for n, f in model.model_fields.items() if f.is_required())
        _FIELDS[model] = (required, frozenset(names.values()))
    return _FIELDS[model]


def tensor_field(body: dict[str, Any], name: str, media: str, max_elements: int) -> Any:
    """A tensor field of a decoded body (numpy), a CompartmentRef (``{"ref": …}``), or None when absent."""
    value = body.get(name)
    if isinstance(value, dict) and "ref" in value:
        return compartment_ref(name, value)
    if value is None or media == MSGPACK:
        if value is not None and not hasattr(value, "dtype"):
            raise MalformedBody(f"{name}: expected a tensor map {{dtype, shape, data}}, received {type(value).__name__}")
        return value
    if isinstance(value, JsonTensor) and value.array is not None:
        return value.array
    try:
        return json_tensor(value, max_elements)
    except WireError as exc:
        raise MalformedBody(f"{name}: {exc}") from None


def init_tensors(init: dict[str, Any]) -> dict[str, Any]:
    """A create's ``init``, refused (422) where it holds a reference: a create takes tensors (a red-team run had a
    reference answered "expected a floating tensor … received dtype str224")."""
    for name, value in init.items():
        if isinstance(value, CompartmentRef):
            raise InvalidRequest(f"init.{str(name)[:64]}: a create takes tensors, not references (read the "
                                 "compartment and send it)", argument=f"init.{str(name)[:64]}")
    return init


def compartment_ref(name: str, value: dict[str, Any]) -> CompartmentRef:
    """``{"ref": "<compartment>"}`` (this instance) or ``{"ref": …, "instance": "<name>"}`` (another of yours)."""
    compartment, instance = value.get("ref"), value.get("instance")
    if (value.keys() - {"ref", "instance"} or not isinstance(compartment, str) or not 0 < len(compartment) <= 128
            or not (instance is None or isinstance(instance, str))):
        raise MalformedBody(f'{name}: a reference is {{"ref": "<compartment>"}}, optionally with "instance": '
                            f'"<name>"; received {str(value)[:120]}')
    return CompartmentRef(compartment, None if instance is None else validate_name(instance))


def _wanted(request: Request) -> list[str]:
    accept = request.headers.get("accept", "")
    return [_media_type(part) for part in accept.split(",") if part.strip()]


def returns_field(value: Any) -> list[str] | None:
    """A request's ``return``: None, or a list of compartment names, each once (MalformedBody otherwise)."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise MalformedBody("return: expected a list of compartment names")
    if len(value) > MAX_RETURNED:  # before any is looked at (a JSON list of strings is one container at any length)
        raise InvalidFields(f"return: {len(value)} names; an instance has at most a few compartments",
                            argument="return")
    if not all(isinstance(r, str) for r in value):
        raise MalformedBody("return: expected a list of compartment names")
    return list(dict.fromkeys(value))  # an answer is a map: a name asked twice is answered once


def check_acceptable(request: Request) -> None:
    """406 before anything is done when ``Accept`` allows neither msgpack nor JSON (a dependency of /v1)."""
    wanted = _wanted(request)
    if not wanted or any(m in _MSGPACK_ALIASES or m in (JSON, "*/*", "application/*") for m in wanted):
        return
    raise NotAcceptable(f"cannot answer in {request.headers.get('accept', '')[:120]!r}; accept {MSGPACK} or {JSON}")


def response_type(request: Request, request_media: str | None = None) -> str:
    """msgpack or JSON, from Accept; with no preference, the request's own type (JSON if it had no body)."""
    wanted = _wanted(request)
    for media in wanted:
        if media in _MSGPACK_ALIASES:
            return MSGPACK
        if media == JSON:
            return JSON
    if not wanted or any(m in ("*/*", "application/*") for m in wanted):
        return request_media if request_media in (MSGPACK, JSON) else JSON
    raise NotAcceptable(f"cannot answer in {request.headers.get('accept', '')[:120]!r}; accept {MSGPACK} or {JSON}")


class PartsResponse(Response):
    """A body written part by part: large tensors and files go out straight from their own memory."""

    def __init__(self, parts: list[bytes | memoryview] | Iterator[bytes | memoryview], length: int,
                 status_code: int, media_type: str, headers: dict[str, str] | None) -> None:
        super().__init__(None, status_code=status_code, headers=headers, media_type=media_type)
        self.parts = parts
        self.headers["content-length"] = str(length)

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        for part in self.parts:
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def encode(content: Any, media: str, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    if media == MSGPACK:
        if values_in(content, ON_LOOP_VALUES, arrays=False) > ON_LOOP_VALUES:  # arrays go as they are: no work
            return MsgpackResponse(content, status, headers)
        parts = packb_parts(content)
        if len(parts) == 1:
            return Response(parts[0], status_code=status, media_type=MSGPACK, headers=headers)
        return PartsResponse(parts, sum(len(p) for p in parts), status, MSGPACK, headers)
    return JsonResponse(content, status, headers)


ON_LOOP_VALUES = 1 << 14  # answers holding more values than this are written on the API's threads


class MsgpackResponse(Response):
    """An answer in msgpack holding many Python values (a listing, statistics), packed when it is sent on the API's
    threads, within the caller's share, never on the event loop."""

    def __init__(self, content: Any, status_code: int, headers: dict[str, str] | None) -> None:
        super().__init__(None, status_code=status_code, headers=headers, media_type=MSGPACK)
        self.content = content

    async def __call__(self, scope, receive, send) -> None:
        content, self.content = self.content, None
        parts = await scope["app"].state.server.threads.run(caller_of(scope), packb_parts, content)
        self.headers["content-length"] = str(sum(len(p) for p in parts))
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        for part in parts[:-1]:
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": parts[-1], "more_body": False})


class JsonResponse(Response):
    """An answer in JSON, written when it is sent. A small one at once, with its length. One holding many values is
    written on a worker thread (~0.3 µs a value, seconds for a large answer: never on the event loop, which every
    connection shares), a part of about a megabyte at a time, each sent as it is made (chunked): the whole text
    would hold ~6 bytes per byte of float32 values (``iter_json_parts``), past what ``max_answer_bytes`` bounds."""

    def __init__(self, content: Any, status_code: int, headers: dict[str, str] | None) -> None:
        super().__init__(None, status_code=status_code, headers=headers, media_type=JSON)
        self.content = content

    async def __call__(self, scope, receive, send) -> None:
        content, self.content = self.content, None
        if values_in(content, ON_LOOP_VALUES) <= ON_LOOP_VALUES:
            parts = json_parts(content)
            self.headers["content-length"] = str(sum(len(p) for p in parts))
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            for part in parts[:-1]:
                await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": parts[-1], "more_body": False})
            return
        written = iter_json_parts(content)
        del content  # the generator holds what it writes, and lets go of it when done
        threads, caller = scope["app"].state.server.threads, caller_of(scope)  # each part within the caller's share
        part = await threads.run(caller, next, written)  # a first part (a JSON text has one): errors before the start
        if "content-length" in self.headers:
            del self.headers["content-length"]  # its length is known once it is sent: chunked
        # once the client leaves, no further part is written (a red-team run's client read 64 KiB of an 87 MB answer
        # and left; the server wrote the rest for 2 s of CPU)
        gone = asyncio.ensure_future(_until_disconnected(receive))
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            while part is not None and not gone.done():
                following = await threads.run(caller, next, written, None)
                await send({"type": "http.response.body", "body": part, "more_body": following is not None})
                part = following
        finally:
            gone.cancel()


def caller_of(scope: Any) -> str | None:
    """Whose request this is, once authenticated (``get_principal`` notes it; None before)."""
    return scope.get("state", {}).get("owner")


async def _until_disconnected(receive) -> None:
    """Return once the client has gone (a body the route left unread, a GET's empty one, is read past first)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def values_in(content: Any, most: int, *, arrays: bool = True) -> int:
    """How many values ``content`` holds — map entries, list items and (``arrays``) array values — counted only until
    past ``most``: a million-item list costs no more to count than one just past it. Each is Python work to encode
    (a red-team run: a dense synapse's statistics, a list of a million filter norms, written on the event loop for
    1.15 s; an admin's listing of 10,000 instances, about 1 s)."""
    count, pending = 0, [content]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            count += len(value)
            if count > most:
                break
            pending.extend(value.values())
        elif isinstance(value, (list, tuple)):
            count += len(value)
            if count > most:
                break
            pending.extend(value)
        elif arrays and hasattr(value, "__array__"):
            count += int(getattr(value, "size", 0) or 0)
            if count > most:
                break
    return count


def request_id_of(scope: Any) -> str | None:
    """The request's id as the RequestContextMiddleware settled it (the header's, shortened, or a new one)."""
    return (scope.get("state") or {}).get("request_id")


def problem(status: int, title: str, detail: str, slug: str, request: Request | None,
            extra: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> Response:
    """An RFC 9457 problem details response."""
    body = {"type": PROBLEM_BASE + slug, "title": title, "status": status, "detail": detail}
    if request is not None:
        body["instance"] = request.url.path
        request_id = request_id_of(request.scope)
        if request_id:
            body["request_id"] = request_id
    for key, value in (extra or {}).items():
        body.setdefault(key, value)
    return Response(json.dumps(body, default=str), status_code=status, media_type=PROBLEM, headers=headers)


def problem_from(exc: SynapseServeError, request: Request) -> Response:
    """The problem response for a domain error; the server's own failures (5xx) are logged."""
    if exc.status >= 500 and not isinstance(exc, NotReady):
        log.error("%s %s: %s", request.method, request.url.path, exc.detail)
    return problem(exc.status, exc.title, exc.detail, exc.slug, request, exc.extra, exc.headers)


MAX_TENSOR_ARGUMENTS = 16  # more than any operation takes (two at most today)
MAX_RETURNED = 64  # more names than any instance has compartments (ten at most today)


def check_tensor_count(tensors: dict[str, Any], what: str) -> None:
    """An operation's tensors are its few arguments: a map of many more is refused before any is looked at (a red-team
    JSON body of 349,525 ``null`` tensors went through several loops over them on the event loop, ~1 s)."""
    if len(tensors) > MAX_TENSOR_ARGUMENTS:
        raise InvalidFields(f"{what}: {len(tensors)} tensors; an operation takes at most {MAX_TENSOR_ARGUMENTS} "
                            "(its arguments, named in GET /v1/kinds)", argument=what)


def tensor_fields(tensors: dict[str, Any], what: str, media: str, max_elements: int) -> dict[str, Any]:
    """Every field of a map of tensors as ``tensor_field`` reads one, once their count is known to be an operation's."""
    check_tensor_count(tensors, what)
    return {k: tensor_field(tensors, k, media, max_elements) for k in tensors}


def map_field(value: Any, what: str) -> dict[str, Any]:
    """A body field that is a map, ``{}`` when absent; anything else (a tensor, a list, a string) is a 400 naming it
    (a tensor's truth value is no answer to whether it was given)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MalformedBody(f"{what}: expected a map, received {type(value).__name__}")
    return value


def if_match(request: Request) -> int | None:
    """The version an ``If-Match: "7"`` header requires, or None (absent or ``*``)."""
    value = request.headers.get("if-match")
    if value is None or value.strip() == "*":
        return None
    tag = value.strip().removeprefix("W/").strip('"')
    if not (tag.isascii() and tag.isdigit()) or len(tag) > 18:  # str.isdigit() takes '²', int() does not
        raise MalformedBody(f'If-Match: expected the ETag of a version, like "7"; received {value[:40]!r}')
    return int(tag)


def idempotency_key(request: Request) -> str | None:
    """The ``Idempotency-Key`` header (1 to 255 printable ASCII characters), or None."""
    value = request.headers.get("idempotency-key")
    if value is None:
        return None
    if not 1 <= len(value) <= 255 or not value.isascii() or not value.isprintable():
        raise MalformedBody("Idempotency-Key: use 1 to 255 printable ASCII characters (a UUID is ideal)")
    return value
