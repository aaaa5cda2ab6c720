"""REST-shaped requests as frames (docs/api.md#frames), and a frame's answer as a call's result or error.

The handles speak REST (method, path, body, headers); the session stream and the in-process
mode carry the same request as one frame, so one mapping here serves both, and the answers
and errors are the REST API's.
"""

from __future__ import annotations

import functools
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from synapse_client._exceptions import status_error

# ops that change nothing: repeated, or run after others, they act the same (the server's list too)
READ_ONLY_OPS = frozenset({"read", "describe", "help", "list", "export", "snapshots", "evicted", "stats", "history",
                           "filters", "kinds", "kind_help"})
_INSTANCE_GETS = {(): "describe", ("help",): "help", ("export",): "export", ("snapshots",): "snapshots",
                  ("stats",): "stats", ("history",): "history"}


def frame_of(method: str, path: str, body: Any, headers: dict[str, str] | None) -> dict[str, Any] | None:
    """The frame for a REST-shaped request, or None for a request frames do not carry (health)."""
    segments, query = _parsed(path)
    if segments[:2] != ("", "v1") or len(segments) < 3:
        return None
    frame: dict[str, Any] = {}
    if query.get("owner"):
        frame["owner"] = query["owner"][0]
    headers = headers or {}
    resource, rest = segments[2], list(segments[3:])
    op = _op_of(method, resource, rest, frame, body, query, headers)
    if op is None:
        return None
    frame["op"] = op
    if_match = headers.get("If-Match")
    # where REST reads it: a packed call refuses it (422) on both, rather than dropping it silently here
    if if_match is not None and op in ("call", "write", "delete", "rollback", "call_many"):
        frame["if_match"] = int(if_match.strip('"'))
    return frame


@functools.lru_cache(maxsize=1024)
def _parsed(path: str) -> tuple[tuple[str, ...], dict[str, list[str]]]:
    """A path's decoded segments and query (a loop sends the same few paths again and again: parsed once each).
    The query is shared between calls: read it, never change it."""
    parts = urlsplit(path)
    return tuple(unquote(s) for s in parts.path.split("/")), parse_qs(parts.query)


def _op_of(method: str, resource: str, rest: list[str], frame: dict[str, Any], body: Any,
           query: dict[str, list[str]], headers: dict[str, str]) -> str | None:
    """Fill ``frame`` with the request's fields; its op, or None."""
    if resource == "kinds":
        if not rest and method == "GET":
            return "kinds"
        if len(rest) == 1 and method == "GET":
            frame["kind"] = rest[0]
            return "kind_help"
        return None
    if resource == "packed":
        if len(rest) == 1 and method == "POST":
            body = dict(body or {})
            frame["operation"] = rest[0]
            for field in ("calls", "names", "tensors", "return"):  # calls, or the stacked form: names and tensors
                if field in body:
                    frame[field] = body[field]
            if "Idempotency-Key" in headers:
                frame["idempotency_key"] = headers["Idempotency-Key"]
            return "call_many"
        return None
    if resource == "evicted":
        if not rest and method == "GET":
            return "evicted"
        if len(rest) == 2 and rest[1] == "restore" and method == "POST":
            frame["name"] = rest[0]
            return "unevict"
        if len(rest) == 1 and method == "DELETE":
            frame["name"] = rest[0]
            return "discard_evicted"
        return None
    if resource != "synapses":
        return None
    if not rest or rest == [""]:
        if method == "POST":
            frame["body"] = body
            return "create"
        return "list" if method == "GET" else None
    if rest == ["import"] and method == "POST":
        frame.update(name=(query.get("name") or [""])[0], blob=body)
        return "import"
    frame["name"], tail = rest[0], tuple(rest[1:])
    if method == "GET" and tail == ("filters.png",):
        frame["options"] = {k: v[0] for k, v in query.items() if k != "owner"}
        return "filters"
    if method == "GET" and tail in _INSTANCE_GETS:
        return _INSTANCE_GETS[tail]
    if method == "DELETE" and not tail:
        return "delete"
    if tail[:1] == ("compartments",) and len(tail) > 1 and method in ("GET", "PUT"):
        frame["compartment"] = "/".join(tail[1:])
        if method == "GET":
            return "read"
        frame["value"] = (body or {}).get("value")
        return "write"
    if tail[:1] == ("snapshots",):
        if len(tail) == 1 and method == "POST":
            frame["snapshot"] = (body or {}).get("snapshot")
            return "snapshot"
        if len(tail) == 3 and tail[2] == "restore" and method == "POST":
            frame["snapshot"] = tail[1]
            return "rollback"
        if len(tail) == 2 and method == "DELETE":
            frame["snapshot"] = tail[1]
            return "delete_snapshot"
        return None
    if method == "POST" and len(tail) == 1:
        body = dict(body or {})
        frame["operation"] = tail[0]
        for field in ("return", "sequence"):
            if field in body:
                frame[field] = body.pop(field)
        frame["tensors"] = body
        if "Idempotency-Key" in headers:
            frame["idempotency_key"] = headers["Idempotency-Key"]
        return "call"
    return None


def result_of(answer: dict[str, Any]) -> Any:
    """A frame's result, or its problem raised as the error REST would have raised."""
    if "error" in answer:  # the connection dropped before it was answered
        raise answer["error"]
    if answer.get("status", 500) >= 400:
        problem = answer.get("problem") or {"detail": "no problem document"}
        raise status_error(answer["status"], problem, problem.get("request_id"))
    return answer.get("result")
