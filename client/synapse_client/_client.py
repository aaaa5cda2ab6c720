"""``SynapseClient`` and ``AsyncSynapseClient``: twins that mirror each other line for line.

``_BaseClient`` holds everything without I/O (URLs, headers, encoding, errors, retry policy);
the two subclasses only send. A handle per instance (``Synapse`` / ``AsyncSynapse``) carries the
operations.

Retries: a connection that could not be made is retried for every call (the request never
left). Once a request may have reached the server (a timeout or a dropped connection while
waiting for the answer), it is retried only if repeating it cannot apply it twice: reads,
compartment writes, and calls carrying an ``Idempotency-Key`` (``evolve`` and ``step`` always
do over the network; in-process nothing is retried). The error says how many attempts were made.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import time
import uuid
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np

from synapse_client import _codec, _ngclearn, _progress
from synapse_client._codec import Ref
from synapse_client._http import AsyncLeanHTTP, LeanHTTP, lean_usable
from synapse_client._exceptions import (
    APIConnectionError,
    APITimeoutError,
    NotFoundError,
    SynapseError,
    WireError,
    status_error,
)
from synapse_client._local import AsyncLocalSession, AsyncLocalTransport, LocalSession, LocalTransport, is_local
from synapse_client._session import AsyncSession, Pending, Session

MSGPACK = "application/msgpack"
OCTET = "application/octet-stream"
PNG_MEDIA = "image/png"
DEFAULT_TIMEOUT = httpx.Timeout(connect=5.0, read=120.0, write=120.0, pool=10.0)
DEFAULT_URL = "http://127.0.0.1:8000"
LEARNING_OPERATIONS = ("evolve", "step")  # not repeatable by accident: sent with an Idempotency-Key
NAME_RULE = "1 to 128 characters: letters, digits, '.', '_' and '-', starting with a letter or digit"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_TOKEN = re.compile(r"[!-~]+")  # what an HTTP header can carry: visible ASCII, no spaces
_OPERATION = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # one path segment: never empty, never a '/'

# an instance's resources beside its operations (POST /v1/synapses/{name}/snapshots makes a snapshot): never sent
# as an operation, where REST would reach the resource and the frames answer "unknown operation"
_NOT_OPERATIONS = frozenset({"help", "export", "snapshots", "stats", "history", "compartments", "filters"})
MAX_VERSION = 10**18 - 1  # what an If-Match ETag may carry (18 digits)
# the request never reached the server: safe to send again, whatever it was
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
START_HINT = "is the server running? Start one with ./scripts/serve.sh (from a checkout) or synapse-serve"


class PNG(bytes):
    """A PNG image's bytes; Jupyter displays it (``_repr_png_``), ``save(path)`` writes it."""

    def _repr_png_(self) -> bytes:
        return bytes(self)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the image to ``path``; returns the path."""
        target = Path(path)
        target.write_bytes(self)
        return target


def as_array(value: Any) -> np.ndarray | Ref:
    """numpy from numpy, jax arrays or nested lists; float64 is sent as float32 (the state's dtype).

    A ``Ref`` passes through: it is sent as a reference, not as values.
    """
    if isinstance(value, Ref):
        return value
    try:
        array = _codec.to_numpy(value)
    except WireError:
        raise
    except ValueError as exc:  # a ragged list: numpy's words are not the user's
        raise WireError(f"cannot send {type(value).__name__} {str(value)[:60]!r} as a tensor ({exc})") from None
    if array.dtype == np.float64:
        with np.errstate(over="ignore"):  # beyond float32's range is Inf, which the server refuses by name
            array = array.astype(np.float32)
    _codec.wire_dtype_name(array.dtype)  # WireError for a dtype the wire cannot carry, in-process too
    return array


def as_values(value: Any, what: str) -> np.ndarray:
    """``as_array`` for what must be values (a write, a create's init): a ``Ref`` is a TypeError."""
    if isinstance(value, Ref):
        raise TypeError(f"{what}: expected an array, not a reference (Ref points at a compartment in operations)")
    return as_array(value)


def check_operation(operation: Any) -> str:
    """``operation`` if it can name one (``forward``; an unknown one is the server's 422), else ValueError (before
    anything is sent)."""
    if not isinstance(operation, str) or not _OPERATION.fullmatch(operation) or operation in _NOT_OPERATIONS \
            or operation in (".", ".."):
        raise ValueError(f"invalid operation name {str(operation)[:80]!r}: an operation of the instance's kind, "
                         "like 'forward' (syn.help() lists them)")
    return operation


def check_if_version(version: Any) -> int:
    """An ``if_version``: a version number (an int from 0 to 10**18 - 1), else TypeError or ValueError."""
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)):
        raise TypeError(f"if_version: expected a version number (an int), received {type(version).__name__}")
    if not 0 <= version <= MAX_VERSION:
        raise ValueError(f"if_version: expected a version number from 0 to {MAX_VERSION}, received {version}")
    return int(version)


def check_idempotency_key(key: Any) -> str:
    """An ``idempotency_key``: 1 to 255 printable ASCII characters (the server's rule), else TypeError or
    ValueError."""
    if not isinstance(key, str):
        raise TypeError(f"idempotency_key: expected a string, received {type(key).__name__}")
    if not 1 <= len(key) <= 255 or not key.isascii() or not key.isprintable():
        raise ValueError("idempotency_key: use 1 to 255 printable ASCII characters (a UUID is ideal)")
    return key


def check_kind_name(kind: Any) -> str:
    """``kind`` if it can name a kind (``HebbianSynapse``; an unknown one is the server's 404), else ValueError
    (before anything is sent: an empty name or a ``/`` would be another address of the API)."""
    if not isinstance(kind, str) or not kind or "/" in kind or kind in (".", ".."):
        raise ValueError(f"invalid kind name {str(kind)[:80]!r}: a kind like 'HebbianSynapse' (client.kinds() "
                         "lists them)")
    return kind


def _returned(returns: Any) -> list[str]:
    """The compartments a call returns: a list of names (one name alone is taken as a list of one)."""
    return [returns] if isinstance(returns, str) else list(returns)


def check_name(name: Any, what: str = "instance name") -> str:
    """``name`` if it follows the server's naming rule, else ValueError (before anything is sent)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"invalid {what} {str(name)[:140]!r}: use {NAME_RULE}")
    return name


def _compartment_path(compartment: Any) -> str:
    """A compartment name as a URL path (``opt_state/0/mu/0``): each segment checked and escaped."""
    segments = compartment.split("/") if isinstance(compartment, str) else [None]
    if not all(isinstance(s, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", s) and s not in (".", "..")
               for s in segments):
        raise ValueError(f"invalid compartment name {str(compartment)[:140]!r}: names like 'weights' or "
                         "'opt_state/0/mu/0'")
    return "/".join(quote(s, safe="") for s in segments)


def _same_value(given: Any, stored: Any) -> bool:
    """Whether a config value asked for equals the one the server stored (lists, numbers, case of strings)."""
    if isinstance(given, np.generic):
        given = given.item()
    if isinstance(given, (list, tuple)) and isinstance(stored, (list, tuple)):
        return len(given) == len(stored) and all(_same_value(g, s) for g, s in zip(given, stored))
    if isinstance(given, dict) and isinstance(stored, dict):
        return all(k in stored and _same_value(v, stored[k]) for k, v in given.items())
    if isinstance(given, str) and isinstance(stored, str):
        return given.lower() == stored.lower()
    if isinstance(given, (int, float)) and isinstance(stored, (int, float)):
        return float(given) == float(stored)
    return given == stored


class _BaseClient:
    def __init__(self, base_url: str, timeout: float | httpx.Timeout | None, max_retries: int,
                 headers: dict[str, str] | None, token: str | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = DEFAULT_TIMEOUT if timeout is None else (
            timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout))
        self.max_retries = max_retries
        self.headers = {"Accept": MSGPACK, "User-Agent": "synapse-client/0.1", **(headers or {})}
        token = token if token is not None else os.environ.get("SYNAPSE_TOKEN")
        if token is not None and token.strip():
            token = token.strip()  # a trailing newline from a file or an echo is not part of the token
            if not _TOKEN.fullmatch(token):
                raise ValueError("the token has characters an HTTP header cannot carry (spaces, quotes, control or "
                                 "non-ASCII characters); check token= or SYNAPSE_TOKEN (the token is not shown)")
            self.headers["Authorization"] = f"Bearer {token}"

    def _prepare(self, body: dict[str, Any] | bytes | None) -> tuple[Any, dict[str, str]]:
        """The content to send and its headers: large tensors go out as views of their own memory."""
        if body is None:
            return None, {}
        if isinstance(body, bytes):  # an instance file
            return body, {"Content-Type": OCTET}
        parts = _codec.packb_parts(body)
        if len(parts) == 1:
            return parts[0], {"Content-Type": MSGPACK}
        return parts, {"Content-Type": MSGPACK, "Content-Length": str(sum(len(p) for p in parts))}

    @staticmethod
    def _decode(response: httpx.Response, content: bytes | None = None) -> Any:
        """The answer's body (``content``: read already, from a stream): numpy arrays (writable: the caller owns
        them), a file's or picture's bytes, or an error raised."""
        media = response.headers.get("content-type", "").split(";")[0].strip()
        content = response.content if content is None else content
        if response.status_code >= 300:  # the client follows no redirects: one is an address the API does not have
            try:
                problem = json.loads(content) if "json" in media else _codec.unpackb(content)
            except (ValueError, WireError):
                problem = {"detail": content[:500].decode("utf-8", "replace")}
            if not isinstance(problem, dict):
                problem = {"detail": str(problem)[:500]}
            if response.status_code < 400:
                problem = {"title": "Redirected", "detail": f"the server answered {response.status_code} (to "
                           f"{response.headers.get('location', '?')[:200]}): not an address of the API (the client "
                           "follows no redirects; is the base URL the server's?)"}
            raise status_error(response.status_code, problem, response.headers.get("x-request-id"))
        if response.status_code == 204 or not content:
            return None
        if media in (OCTET, PNG_MEDIA):
            return bytes(content)  # the lean path reads into a bytearray: the caller gets bytes either way
        if media == MSGPACK:
            return _codec.unpackb(content, writable=True)
        return json.loads(content)

    def _connection_error(self, method: str, path: str, exc: httpx.TransportError, attempts: int,
                          retried: bool) -> APIConnectionError:
        """The error after the last attempt: where, what, how many attempts, and what to do."""
        tries = f"{attempts} attempt{'s' if attempts > 1 else ''}"
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, _NOT_SENT):
            why = "" if retried else "; not retried: the server may still be running it, and repeating it could " \
                                     "run it twice"
            return APITimeoutError(
                f"{method} {path}: no answer from {self.base_url} in time ({type(exc).__name__}) after {tries}{why}. "
                "For long calls pass a longer timeout, e.g. SynapseClient(url, timeout=600)", exc.request)
        if isinstance(exc, _NOT_SENT):
            return APIConnectionError(f"{method} {path}: cannot connect to synapse-serve at {self.base_url} "
                                      f"({type(exc).__name__}: {exc}) after {tries}; {START_HINT}", exc.request)
        why = "" if retried else " (not retried: the server may have applied it)"
        return APIConnectionError(f"{method} {path}: the connection to {self.base_url} failed "
                                  f"({type(exc).__name__}: {exc}) after {tries}{why}", exc.request)

    def _retryable(self, exc: httpx.TransportError, attempt: int, retry: bool) -> bool:
        return attempt < self.max_retries and (retry or isinstance(exc, _NOT_SENT))

    def _wait_and_retry(self, response: Any, attempt: int, retry: bool) -> bool:
        """Whether a 503 (the server starting, an instance still being restored after a restart) is waited out and
        the call sent again: only a call safe to repeat (a keyed call is applied once however often it is sent; the
        first try may have been applied before the restart), within max_retries."""
        return response.status_code == 503 and retry and attempt < self.max_retries

    def _retry_after(self, response: Any, attempt: int) -> float:
        """The server's Retry-After (seconds; at most 8), else the backoff."""
        value = response.headers.get("retry-after", "").strip()
        if value.isascii() and value.isdigit():
            return min(8.0, float(value))
        return self._backoff(attempt)

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter: 0.25 s, 0.5 s, 1 s, … capped at 8 s."""
        return min(8.0, 0.25 * 2**attempt) * (0.5 + random.random() / 2)

    def _op_headers(self, operation: str, if_version: int | None, idempotency_key: str | None) -> dict[str, str]:
        """Over the network evolve and step always carry an Idempotency-Key (kept across retries): retrying them is
        safe. In-process there is no connection to drop and nothing is retried: no key unless one is given (the
        server would hash the tensors to remember it, ~70 µs for 131 KB)."""
        headers = {}
        check_operation(operation)
        if idempotency_key is None and operation in LEARNING_OPERATIONS and self._local is None:
            idempotency_key = uuid.uuid4().hex
        if idempotency_key is not None:
            headers["Idempotency-Key"] = check_idempotency_key(idempotency_key)
        if if_version is not None:
            headers["If-Match"] = f'"{check_if_version(if_version)}"'
        return headers

    @staticmethod
    def _op_body(tensors: dict[str, Any], returns: Sequence[str] | None,
                 sequence: dict[str, Any] | None = None) -> dict[str, Any]:
        body = {k: as_array(v) for k, v in tensors.items() if v is not None}
        if returns is not None:
            body["return"] = _returned(returns)
        if sequence is not None:
            if not isinstance(sequence, dict):
                raise TypeError(f"sequence: expected a dict like {{'every': 10}} or {{'last': True}}, received "
                                f"{type(sequence).__name__}")
            body["sequence"] = dict(sequence)
        return body

    def _packed_request(self, operation: str, calls: Any, returns: Sequence[str] | None,
                        idempotency_key: str | None, owner: str | None) -> tuple[str, dict[str, Any], dict[str, str]]:
        items = list(calls.items()) if isinstance(calls, dict) else list(calls)
        for item in items:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], dict)):
                pair = isinstance(item, tuple) and len(item) == 2
                what = f"{type(item[1]).__name__} for {str(item[0])[:80]!r}" if pair else repr(item)[:80]
                raise TypeError(f"calls: expected {{name: {{tensor: value}}}} (or (name, {{tensor: value}}) pairs), "
                                f"received {what}")
        body: dict[str, Any] = {"calls": [{"name": check_name(name), "tensors": self._op_body(dict(tensors), None)}
                                          for name, tensors in items]}
        if returns is not None:
            body["return"] = _returned(returns)
        headers = self._op_headers(operation, None, idempotency_key)
        return f"/v1/packed/{quote(str(operation), safe='')}{self._query(owner)}", body, headers

    def _stacked_request(self, operation: str, names: Sequence[str], tensors: dict[str, Any],
                         returns: Sequence[str] | None, idempotency_key: str | None,
                         owner: str | None) -> tuple[str, dict[str, Any], dict[str, str]]:
        if isinstance(names, str):
            raise TypeError("names: a list of instance names, not one string")
        if not isinstance(tensors, dict):
            raise TypeError(f"tensors: expected {{tensor: (instances, batch, …) array}}, received "
                            f"{type(tensors).__name__}")
        body: dict[str, Any] = {"names": [check_name(name) for name in names],
                                "tensors": self._op_body(dict(tensors), None)}
        if returns is not None:
            body["return"] = _returned(returns)
        headers = self._op_headers(operation, None, idempotency_key)
        return f"/v1/packed/{quote(str(operation), safe='')}{self._query(owner)}", body, headers

    @staticmethod
    def _ngclearn_plan(path: str | os.PathLike[str], kind: str | None, config: dict[str, Any] | None,
                       component: str | None, allow_pickle: bool) -> tuple[str, dict, dict, int, list[tuple]]:
        """What importing an ngclearn save takes: kind, config, the create's init and seed, then the compartment
        writes in order (mask before weights: the weights are written exactly as saved)."""
        folder, component, entry, meta = _ngclearn.find_save(Path(path), component)
        if config is None:
            if meta is not None:  # our own export: its config is exact
                kind, config = meta["kind"], meta["config"]
            elif entry is not None:
                kind, config = _ngclearn.config_from_entry(entry)
            else:
                raise ValueError(f"{folder}: a component save has no hyperparameters (ngclearn keeps them only in "
                                 "a model folder's roots.json): pass kind= and config=")
        elif kind is None:
            raise ValueError("config= needs kind= (HebbianSynapse or HebbianDeconvSynapse)")
        arrays, objects = _ngclearn._safe_npz(_ngclearn._regular_file(folder, folder / f"{component}.npz",
                                                                      "component's arrays"))
        pickled = folder / f"{component}_opt_params.pkl"
        opt = _ngclearn.read_opt_params(pickled) if allow_pickle and pickled.is_file() else None
        config, compartments = _ngclearn.to_service(kind, config, arrays, objects, opt)
        optim = config.get("optim_type", "sgd")
        if opt is None and not (kind == "HebbianDeconvSynapse" and optim == "sgd"):
            warnings.warn(f"{folder / component}: the optimizer state was not read (it is a pickle: set "
                          f"allow_pickle to True for a file you trust); the instance starts with a fresh {optim} state",
                          stacklevel=3)
        init = {"weights": compartments.pop("weights")}
        if "biases" in compartments:
            init["biases"] = compartments.pop("biases")
        key = compartments["key"]
        seed = int(meta["seed"]) if meta is not None else (int(key[1]) if int(key[0]) == 0 else 0)
        writes = [(c, compartments.pop(c)) for c in ("mask",) if c in compartments]
        writes += [("weights", init["weights"])] if writes else []
        writes += sorted(compartments.items())
        return kind, config, init, seed, writes

    @staticmethod
    def _sequence_options(every: int | None, last: bool) -> dict[str, Any]:
        if last and every is not None:
            raise ValueError("give every or last, not both")
        return {"last": True} if last else ({} if every is None else {"every": int(every)})

    @staticmethod
    def _create_body(name: str, kind: str, config: dict[str, Any], init: dict[str, Any] | None,
                     seed: int, durability: str | None, device: str | int | None) -> dict[str, Any]:
        if not isinstance(config, dict):
            raise TypeError(f"config: expected a dict of hyperparameters (kind_help(kind) lists them), received "
                            f"{type(config).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
            raise ValueError(f"seed: expected an int from 0 to 2**63 - 1, received {str(seed)[:40]!r}")
        body: dict[str, Any] = {"name": check_name(name), "kind": kind, "config": dict(config), "seed": int(seed)}
        if durability is not None:
            body["durability"] = durability
        if device is not None:
            body["device"] = device
        if init:
            body["init"] = {k: as_values(v, f"init: {k}") for k, v in init.items()}
        return body

    @staticmethod
    def _query(owner: str | None) -> str:
        return "" if owner is None else f"?owner={quote(check_name(owner, 'owner'), safe='')}"

    @staticmethod
    def _matches(description: dict[str, Any], kind: str, config: dict[str, Any]) -> None:
        """ValueError if an existing instance is of another kind or config than asked (get_or_create)."""
        stored = description.get("config", {})
        different = [k for k, v in config.items() if k in stored and not _same_value(v, stored[k])]
        if description.get("kind") != kind or different:
            what = f"kind {description.get('kind')!r}" if description.get("kind") != kind else \
                ", ".join(f"{k}={stored[k]!r}" for k in different)
            raise ValueError(f"instance {description.get('name')!r} exists with {what}, not as asked; use another "
                             "name, or get() it as it is")


def _titled(progress: bool, title: str) -> dict[str, str]:
    """The request's progress argument: only when asked (a session's or in-process request takes it too)."""
    return {"progress": title} if progress else {}


async def _stream(parts: Iterable[bytes | memoryview]):
    """Body parts for httpx's AsyncClient (which takes only async iterables); a fresh one per attempt."""
    for part in parts:
        yield part


class SynapseClient(_BaseClient):
    """Blocking client. Use as a context manager, or call ``close()``.

    ``token`` (default: the ``SYNAPSE_TOKEN`` environment variable) is sent as a bearer token;
    ``timeout`` (seconds, or an ``httpx.Timeout``) bounds each call (default: 120 s to read an answer).

    Example::

        with SynapseClient("http://127.0.0.1:8000") as client:
            syn = client.create("enc", kind="HebbianDeconvSynapse",
                                config={"shape": [3, 3, 1, 4], "x_shape": [8, 8], "eta": 0.01})
            y = syn.forward(x)
    """

    def __init__(self, base_url: str = DEFAULT_URL, *, timeout: float | httpx.Timeout | None = None,
                 max_retries: int = 2, headers: dict[str, str] | None = None, token: str | None = None,
                 transport: httpx.BaseTransport | None = None, local_settings: dict[str, Any] | None = None) -> None:
        super().__init__(base_url, timeout, max_retries, headers, token)
        self._local = LocalTransport(self.base_url, local_settings or {}) if is_local(self.base_url) else None
        self._http = None if self._local else httpx.Client(base_url=self.base_url, timeout=self.timeout,
                                                           headers=self.headers, transport=transport)
        # plain http with no proxy and no custom transport: requests skip httpx's machinery (_http.py)
        self._lean = LeanHTTP(self.base_url, self.timeout, self.headers) \
            if self._local is None and transport is None and lean_usable(self.base_url) else None

    def request(self, method: str, path: str, body: dict[str, Any] | bytes | None = None, *, retry: bool,
                headers: dict[str, str] | None = None, progress: str | None = None) -> Any:
        """Send one call. A connection that could not be made is always retried; ``retry=True`` (calls safe to
        repeat) also retries timeouts and dropped connections after the request was sent. ``progress``: show a
        bar with this title while the body goes out (a body) or comes in (no body)."""
        if self._local is not None:
            return _progress.finished(self._local.request(method, path, body, headers), progress)
        content, content_headers = self._prepare(body)
        headers = {**content_headers, **(headers or {})}
        attempt = 0
        while True:
            try:
                if progress is not None:
                    return self._with_progress(method, path, content, headers, progress)
                if self._lean is not None and self._lean.takes(path, headers):
                    response = self._lean.request(method, path, content, headers)
                else:
                    response = self._http.request(method, path, content=content, headers=headers)
            except httpx.TransportError as exc:
                if not self._retryable(exc, attempt, retry):
                    raise self._connection_error(method, path, exc, attempt + 1, retry) from None
            else:
                if not self._wait_and_retry(response, attempt, retry):
                    return self._decode(response)
                time.sleep(self._retry_after(response, attempt))
                attempt += 1
                continue
            time.sleep(self._backoff(attempt))
            attempt += 1

    def _with_progress(self, method: str, path: str, content: Any, headers: dict[str, str], title: str) -> Any:
        if content is not None:  # an upload: the bar follows the body out
            total = int(headers.get("Content-Length") or _progress.body_length(content))
            with _progress.bar(total, title) as line:
                return self._decode(self._http.request(method, path, content=_progress.upload(content, line),
                                                       headers={**headers, "Content-Length": str(total)}))
        with self._http.stream(method, path, headers=headers) as response:  # a download: the bar follows the answer
            if response.status_code >= 400:
                response.read()
                return self._decode(response)
            with _progress.Download(response.headers.get("content-length"), title) as received:
                for chunk in response.iter_bytes(_progress.CHUNK_BYTES):
                    received.add(chunk)
            return self._decode(response, received.body())

    def submit(self, method: str, path: str, body: dict[str, Any] | bytes | None = None, *, retry: bool,
               headers: dict[str, str] | None = None) -> Pending:
        """Send one call now; its answer (or error) from ``.result()`` (over HTTP the call completes here)."""
        try:
            answer = self.request(method, path, body, retry=retry, headers=headers)
        except SynapseError as exc:
            error = exc
            return Pending(lambda: (_ for _ in ()).throw(error))
        return Pending(lambda: answer)

    def session(self) -> Session | LocalSession:
        """A session stream: ``with client.session() as s: syn = s.get("enc")`` — the same handles and answers,
        each operation one WebSocket frame instead of an HTTP request (docs/api.md#session-stream). In the
        in-process mode calls are direct already: the session's handles are the client's."""
        return LocalSession(self) if self._local is not None else Session(self)

    def call_many(self, operation: str, calls: dict[str, dict[str, Any]] | Sequence[tuple[str, dict[str, Any]]], *,
                  returns: Sequence[str] | None = None, idempotency_key: str | None = None,
                  owner: str | None = None) -> dict[str, dict[str, Any]]:
        """One operation on many instances in one request: ``{name: {tensor: value}}`` in, ``{name: answer}`` out.

        All are applied or none (an error names the call); each answer equals a separate call's (bit for bit;
        the deconvolution's evolve within float32 rounding, docs/api.md), and instances of one kind, config and
        shapes run as one device call on the server. Example::

            outs = client.call_many("forward", {f"col-{i}": {"inputs": x[i]} for i in range(256)})
            y3 = outs["col-3"]["outputs"]
        """
        path, body, headers = self._packed_request(operation, calls, returns, idempotency_key, owner)
        answer = self.request("POST", path, body, retry="Idempotency-Key" in headers, headers=headers)
        return {result.pop("name"): result for result in answer["results"]}

    def call_stacked(self, operation: str, names: Sequence[str], tensors: dict[str, Any], *,
                     returns: Sequence[str] | None = None, idempotency_key: str | None = None,
                     owner: str | None = None) -> dict[str, Any]:
        """``call_many`` for a population: each tensor stacked along a leading instance axis, the answer too.

        ``tensors[arg][i]`` goes to ``names[i]``; the answer is ``{"names", "versions", <compartment>:
        (len(names), …)}``, row ``i`` of each compartment being what a separate call on ``names[i]``
        answers (bit for bit; the deconvolution's evolve within float32 rounding, docs/api.md). The instances must
        return one shape (one config). All are applied or none.
        Example::

            out = client.call_stacked("forward", [f"col-{i}" for i in range(256)], {"inputs": xs})  # xs: (256, B, …)
            ys = out["outputs"]  # (256, B, …)
        """
        path, body, headers = self._stacked_request(operation, names, tensors, returns, idempotency_key, owner)
        return self.request("POST", path, body, retry="Idempotency-Key" in headers, headers=headers)

    def create(self, name: str, *, kind: str, config: dict[str, Any], init: dict[str, Any] | None = None,
               seed: int = 0, durability: str | None = None, device: str | int | None = None,
               owner: str | None = None) -> Synapse:
        """Create a named instance and return its handle (retried only if it could not be sent at all).

        ``durability`` (``"sync"``, ``"interval"``, ``"off"``) overrides the server's mode for this instance;
        ``device`` places it (``"cuda:1"`` or an index; see ``GET /v1/devices``); ``owner`` (admins) creates it
        for another owner.
        """
        body = self._create_body(name, kind, config, init, seed, durability, device)
        self.request("POST", f"/v1/synapses{self._query(owner)}", body, retry=False)
        return Synapse(self, name, owner=owner)

    def get(self, name: str, *, owner: str | None = None) -> Synapse:
        """The handle of an existing instance (NotFoundError if there is none); admins may name its ``owner``."""
        handle = Synapse(self, name, owner=owner)
        self.request("GET", handle._path + handle._query, retry=True)
        return handle

    def get_or_create(self, name: str, *, kind: str, config: dict[str, Any], init: dict[str, Any] | None = None,
                      seed: int = 0, durability: str | None = None, device: str | int | None = None,
                      owner: str | None = None) -> Synapse:
        """The instance ``name`` if it exists (ValueError if it is of another kind or config than asked), else a
        new one created as ``create`` would: a script can be run again and go on learning where it stopped."""
        for _ in range(3):  # a create racing ours makes the next get find it
            try:
                handle = Synapse(self, name, owner=owner)
                self._matches(handle.describe(), kind, config)
                return handle
            except NotFoundError:
                pass
            try:
                return self.create(name, kind=kind, config=config, init=init, seed=seed, durability=durability,
                                   device=device, owner=owner)
            except SynapseError as exc:
                if getattr(exc, "status_code", None) != 409:
                    raise
        raise SynapseError(f"instance {name!r} kept appearing and disappearing; try again")

    def from_ngclearn(self, path: str | os.PathLike[str], *, name: str, kind: str | None = None,
                      config: dict[str, Any] | None = None, component: str | None = None, allow_pickle: bool = False,
                      durability: str | None = None, owner: str | None = None) -> Synapse:
        """Create instance ``name`` from an ngclearn 3.2.3 save: a model folder (``ctx.save_to_json``; the
        hyperparameters come from its roots.json), a component folder or ``.npz`` (``syn.save``; pass ``kind``
        and ``config``), or a folder ``Synapse.to_ngclearn`` wrote. Every array is checked before it is read
        (numbers only, sane shapes); the weights, biases, mask, signals and key become the instance's.

        With ``allow_pickle`` true it also reads the optimizer state from ``<component>_opt_params.pkl``. **A pickle can
        run code when loaded**: pass it only for files you trust. Even then only numpy arrays are accepted (any
        other object is refused). Without it the instance starts with a fresh optimizer state (a warning says so).
        Runs in this process; the server is sent arrays only. Docs: docs/ngclearn.md.
        """
        kind, config, init, seed, writes = self._ngclearn_plan(path, kind, config, component, allow_pickle)
        syn = self.create(name, kind=kind, config=config, init=init, seed=seed, durability=durability, owner=owner)
        try:
            for compartment, value in writes:
                syn.set(compartment, value)
        except BaseException:
            with contextlib.suppress(SynapseError):
                syn.delete()  # nothing half-imported is left behind
            raise
        return syn

    def import_(self, path: str | os.PathLike[str], *, name: str, owner: str | None = None,
                progress: bool = False) -> Synapse:
        """Create instance ``name`` from a file written by ``Synapse.export`` (bit-identical state;
        ``progress=True``: a bar while it uploads)."""
        query = f"?name={quote(check_name(name), safe='')}" + (f"&owner={quote(check_name(owner, 'owner'))}"
                                                               if owner is not None else "")
        self.request("POST", f"/v1/synapses/import{query}", Path(path).read_bytes(), retry=False,
                     **_titled(progress, f"{name} import"))
        return Synapse(self, name, owner=owner)

    def list(self, *, owner: str | None = None) -> list[dict[str, Any]]:
        """Descriptions of your instances (an admin's: everyone's, or ``owner``'s)."""
        return self.request("GET", f"/v1/synapses{self._query(owner)}", retry=True)["synapses"]

    def evicted(self) -> list[dict[str, Any]]:
        """Your instances the server evicted for idleness (name, when, file size): ``restore_evicted`` brings
        one back."""
        return self.request("GET", "/v1/evicted", retry=True)["evicted"]

    def restore_evicted(self, name: str) -> Synapse:
        """Bring back an evicted instance as it was when evicted (version and counters go on); returns its handle."""
        self.request("POST", f"/v1/evicted/{quote(check_name(name), safe='')}/restore", retry=False)
        return Synapse(self, name)

    def discard_evicted(self, name: str) -> None:
        """Delete an evicted instance's copy for good: it can no longer be restored, and its file leaves your
        snapshot quota. A live instance of that name is not touched."""
        self.request("DELETE", f"/v1/evicted/{quote(check_name(name), safe='')}", retry=False)

    def kinds(self) -> list[dict[str, Any]]:
        """The synapse kinds the server offers."""
        return self.request("GET", "/v1/kinds", retry=True)["kinds"]

    def kind_help(self, kind: str) -> dict[str, Any]:
        """A kind's help: hyperparameters, compartments, dynamics."""
        return self.request("GET", f"/v1/kinds/{quote(check_kind_name(kind), safe='')}", retry=True)

    def health(self) -> bool:
        """True when the server is live and ready."""
        try:
            self.request("GET", "/readyz", retry=False)
            return True
        except SynapseError:
            return False

    def close(self) -> None:
        """Close the connection pool (in-process: write what changed, as the durability setting says)."""
        if self._local is not None:
            self._local.close()
        else:
            self._http.close()
            if self._lean is not None:
                self._lean.close()

    def __enter__(self) -> SynapseClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncSynapseClient(_BaseClient):
    """The asyncio twin of SynapseClient: same methods, awaited.

    Example::

        async with AsyncSynapseClient("http://127.0.0.1:8000") as client:
            syn = await client.create("enc", kind="HebbianDeconvSynapse", config={...})
            y = await syn.forward(x)
    """

    def __init__(self, base_url: str = DEFAULT_URL, *, timeout: float | httpx.Timeout | None = None,
                 max_retries: int = 2, headers: dict[str, str] | None = None, token: str | None = None,
                 transport: httpx.AsyncBaseTransport | None = None,
                 local_settings: dict[str, Any] | None = None) -> None:
        super().__init__(base_url, timeout, max_retries, headers, token)
        self._local = AsyncLocalTransport(self.base_url, local_settings or {}) if is_local(self.base_url) else None
        self._http = None if self._local else httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout,
                                                                headers=self.headers, transport=transport)
        # plain http with no proxy and no custom transport: requests skip httpx's machinery (_http.py)
        self._lean = AsyncLeanHTTP(self.base_url, self.timeout, self.headers) \
            if self._local is None and transport is None and lean_usable(self.base_url) else None

    async def request(self, method: str, path: str, body: dict[str, Any] | bytes | None = None, *,
                      retry: bool, headers: dict[str, str] | None = None, progress: str | None = None) -> Any:
        """Send one call. A connection that could not be made is always retried; ``retry=True`` (calls safe to
        repeat) also retries timeouts and dropped connections after the request was sent. ``progress``: show a
        bar with this title while the body goes out (a body) or comes in (no body)."""
        if self._local is not None:
            return _progress.finished(await self._local.request(method, path, body, headers), progress)
        content, content_headers = self._prepare(body)
        headers = {**content_headers, **(headers or {})}
        attempt = 0
        while True:
            try:
                if progress is not None:
                    return await self._with_progress(method, path, content, headers, progress)
                if self._lean is not None and self._lean.takes(path, headers):
                    response = await self._lean.request(method, path, content, headers)
                else:
                    response = await self._http.request(
                        method, path, content=_stream(content) if isinstance(content, list) else content,
                        headers=headers)
            except httpx.TransportError as exc:
                if not self._retryable(exc, attempt, retry):
                    raise self._connection_error(method, path, exc, attempt + 1, retry) from None
            else:
                if not self._wait_and_retry(response, attempt, retry):
                    return self._decode(response)
                await asyncio.sleep(self._retry_after(response, attempt))
                attempt += 1
                continue
            await asyncio.sleep(self._backoff(attempt))
            attempt += 1

    async def _with_progress(self, method: str, path: str, content: Any, headers: dict[str, str], title: str) -> Any:
        if content is not None:  # an upload: the bar follows the body out
            total = int(headers.get("Content-Length") or _progress.body_length(content))
            with _progress.bar(total, title) as line:
                return self._decode(await self._http.request(
                    method, path, content=_stream(_progress.upload(content, line)),
                    headers={**headers, "Content-Length": str(total)}))
        async with self._http.stream(method, path, headers=headers) as response:  # a download
            if response.status_code >= 400:
                await response.aread()
                return self._decode(response)
            with _progress.Download(response.headers.get("content-length"), title) as received:
                async for chunk in response.aiter_bytes(_progress.CHUNK_BYTES):
                    received.add(chunk)
            return self._decode(response, received.body())

    def submit(self, method: str, path: str, body: dict[str, Any] | bytes | None = None, *, retry: bool,
               headers: dict[str, str] | None = None) -> asyncio.Task:
        """Send one call; await the returned task for its answer (concurrent calls run side by side). The tensors
        are taken now: changing them before the task runs changes nothing sent."""
        return asyncio.get_running_loop().create_task(self.request(method, path, _codec.copied(body), retry=retry,
                                                                   headers=headers))

    def session(self) -> AsyncSession | AsyncLocalSession:
        """A session stream: ``async with client.session() as s: syn = await s.get("enc")`` — the same handles
        and answers, each operation one WebSocket frame instead of an HTTP request (in-process: the client's)."""
        return AsyncLocalSession(self) if self._local is not None else AsyncSession(self)

    async def call_many(self, operation: str,
                        calls: dict[str, dict[str, Any]] | Sequence[tuple[str, dict[str, Any]]], *,
                        returns: Sequence[str] | None = None, idempotency_key: str | None = None,
                        owner: str | None = None) -> dict[str, dict[str, Any]]:
        """One operation on many instances in one request (see ``SynapseClient.call_many``)."""
        path, body, headers = self._packed_request(operation, calls, returns, idempotency_key, owner)
        answer = await self.request("POST", path, body, retry="Idempotency-Key" in headers, headers=headers)
        return {result.pop("name"): result for result in answer["results"]}

    async def call_stacked(self, operation: str, names: Sequence[str], tensors: dict[str, Any], *,
                           returns: Sequence[str] | None = None, idempotency_key: str | None = None,
                           owner: str | None = None) -> dict[str, Any]:
        """One operation on a population, tensors and answer stacked (see ``SynapseClient.call_stacked``)."""
        path, body, headers = self._stacked_request(operation, names, tensors, returns, idempotency_key, owner)
        return await self.request("POST", path, body, retry="Idempotency-Key" in headers, headers=headers)

    async def create(self, name: str, *, kind: str, config: dict[str, Any], init: dict[str, Any] | None = None,
                     seed: int = 0, durability: str | None = None, device: str | int | None = None,
                     owner: str | None = None) -> AsyncSynapse:
        """Create a named instance and return its handle (retried only if it could not be sent at all).

        ``durability`` (``"sync"``, ``"interval"``, ``"off"``) overrides the server's mode for this instance;
        ``device`` places it; ``owner`` (admins) creates it for another owner.
        """
        body = self._create_body(name, kind, config, init, seed, durability, device)
        await self.request("POST", f"/v1/synapses{self._query(owner)}", body, retry=False)
        return AsyncSynapse(self, name, owner=owner)

    async def get(self, name: str, *, owner: str | None = None) -> AsyncSynapse:
        """The handle of an existing instance (NotFoundError if there is none); admins may name its ``owner``."""
        handle = AsyncSynapse(self, name, owner=owner)
        await self.request("GET", handle._path + handle._query, retry=True)
        return handle

    async def get_or_create(self, name: str, *, kind: str, config: dict[str, Any],
                            init: dict[str, Any] | None = None, seed: int = 0, durability: str | None = None,
                            device: str | int | None = None, owner: str | None = None) -> AsyncSynapse:
        """The instance ``name`` if it exists (ValueError if it is of another kind or config than asked), else a
        new one created as ``create`` would."""
        for _ in range(3):
            try:
                handle = AsyncSynapse(self, name, owner=owner)
                self._matches(await handle.describe(), kind, config)
                return handle
            except NotFoundError:
                pass
            try:
                return await self.create(name, kind=kind, config=config, init=init, seed=seed, durability=durability,
                                         device=device, owner=owner)
            except SynapseError as exc:
                if getattr(exc, "status_code", None) != 409:
                    raise
        raise SynapseError(f"instance {name!r} kept appearing and disappearing; try again")

    async def from_ngclearn(self, path: str | os.PathLike[str], *, name: str, kind: str | None = None,
                            config: dict[str, Any] | None = None, component: str | None = None,
                            allow_pickle: bool = False, durability: str | None = None,
                            owner: str | None = None) -> AsyncSynapse:
        """Create instance ``name`` from an ngclearn 3.2.3 save (see ``SynapseClient.from_ngclearn``; a pickle
        can run code when loaded: ``allow_pickle`` only for files you trust)."""
        kind, config, init, seed, writes = self._ngclearn_plan(path, kind, config, component, allow_pickle)
        syn = await self.create(name, kind=kind, config=config, init=init, seed=seed, durability=durability,
                                owner=owner)
        try:
            for compartment, value in writes:
                await syn.set(compartment, value)
        except BaseException:
            with contextlib.suppress(SynapseError):
                await syn.delete()  # nothing half-imported is left behind
            raise
        return syn

    async def import_(self, path: str | os.PathLike[str], *, name: str, owner: str | None = None,
                      progress: bool = False) -> AsyncSynapse:
        """Create instance ``name`` from a file written by ``AsyncSynapse.export`` (bit-identical state;
        ``progress=True``: a bar while it uploads)."""
        query = f"?name={quote(check_name(name), safe='')}" + (f"&owner={quote(check_name(owner, 'owner'))}"
                                                               if owner is not None else "")
        await self.request("POST", f"/v1/synapses/import{query}", Path(path).read_bytes(), retry=False,
                           **_titled(progress, f"{name} import"))
        return AsyncSynapse(self, name, owner=owner)

    async def list(self, *, owner: str | None = None) -> list[dict[str, Any]]:
        """Descriptions of your instances (an admin's: everyone's, or ``owner``'s)."""
        return (await self.request("GET", f"/v1/synapses{self._query(owner)}", retry=True))["synapses"]

    async def evicted(self) -> list[dict[str, Any]]:
        """Your instances the server evicted for idleness (name, when, file size)."""
        return (await self.request("GET", "/v1/evicted", retry=True))["evicted"]

    async def restore_evicted(self, name: str) -> AsyncSynapse:
        """Bring back an evicted instance as it was when evicted; returns its handle."""
        await self.request("POST", f"/v1/evicted/{quote(check_name(name), safe='')}/restore", retry=False)
        return AsyncSynapse(self, name)

    async def discard_evicted(self, name: str) -> None:
        """Delete an evicted instance's copy for good: it can no longer be restored, and its file leaves your
        snapshot quota. A live instance of that name is not touched."""
        await self.request("DELETE", f"/v1/evicted/{quote(check_name(name), safe='')}", retry=False)

    async def kinds(self) -> list[dict[str, Any]]:
        """The synapse kinds the server offers."""
        return (await self.request("GET", "/v1/kinds", retry=True))["kinds"]

    async def kind_help(self, kind: str) -> dict[str, Any]:
        """A kind's help: hyperparameters, compartments, dynamics."""
        return await self.request("GET", f"/v1/kinds/{quote(check_kind_name(kind), safe='')}", retry=True)

    async def health(self) -> bool:
        """True when the server is live and ready."""
        try:
            await self.request("GET", "/readyz", retry=False)
            return True
        except SynapseError:
            return False

    async def close(self) -> None:
        """Close the connection pool (in-process: write what changed, as the durability setting says)."""
        if self._local is not None:
            await self._local.close()
        else:
            await self._http.aclose()
            if self._lean is not None:
                await self._lean.aclose()

    async def __aenter__(self) -> AsyncSynapseClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class _Handle:
    """What both handles share: the instance's name, owner and URLs."""

    def __init__(self, client: _BaseClient, name: str, owner: str | None = None) -> None:
        self.client, self.name, self.owner = client, check_name(name), owner
        self._path = f"/v1/synapses/{quote(name, safe='')}"
        self._query = _BaseClient._query(owner)

    def _url(self, suffix: str = "") -> str:
        return f"{self._path}{suffix}{self._query}"

    def __repr__(self) -> str:
        owner = f", owner={self.owner!r}" if self.owner is not None else ""
        return f"{type(self).__name__}({self.name!r}{owner} at {self.client.base_url})"

    def _picture_url(self, compartment: str, normalize: str, scale: int | None, columns: int | None,
                     tile: tuple[int, int] | None, padding: int | None) -> str:
        options = {"compartment": _compartment_path(compartment), "normalize": normalize, "scale": scale,
                   "columns": columns, "tile": None if tile is None else f"{int(tile[0])},{int(tile[1])}",
                   "padding": padding}
        query = "&".join(f"{k}={quote(str(v), safe=',/')}" for k, v in options.items() if v is not None)
        return f"{self._path}/filters.png{self._query}{'&' if self._query else '?'}{query}"

    @staticmethod
    def _picture(answer: Any, path: str | os.PathLike[str] | None) -> PNG:
        png = PNG(answer["png"] if isinstance(answer, dict) else answer)  # a frame's answer, or REST's body
        if path is not None:
            Path(path).write_bytes(png)
        return png


class Synapse(_Handle):
    """Handle of one named instance on the server; numpy in, numpy out (writable arrays of your own)."""

    def forward(self, inputs: Any) -> np.ndarray:
        """outputs = forward transform of ``inputs`` (see ``help()``); returns the outputs."""
        return self.call("forward", inputs=inputs)["outputs"]

    def evolve(self, pre: Any, post: Any, *, returns: Sequence[str] = (), if_version: int | None = None,
               idempotency_key: str | None = None) -> dict[str, Any]:
        """One Hebbian update, applied exactly once even when a dropped connection is retried (over the network it
        carries an Idempotency-Key: ``idempotency_key``, or a fresh one). ``if_version`` makes it fail with 412 if
        the version has moved.

        Returns ``{"version": …}`` plus any compartments named in ``returns`` (e.g. ``("dWeights",)``).
        """
        return self.call("evolve", pre=pre, post=post, returns=returns, if_version=if_version,
                         idempotency_key=idempotency_key)

    def backtransmit(self, post: Any = None) -> np.ndarray:
        """dInputs = sign_value · the transform's adjoint at ``post`` (default: the stored post)."""
        return self.call("backtransmit", post=post)["dInputs"]

    def step(self, inputs: Any, post: Any, *, returns: Sequence[str] | None = None, if_version: int | None = None,
             idempotency_key: str | None = None) -> dict[str, Any]:
        """forward(inputs), evolve(pre=inputs, post), backtransmit(post) in one round trip and one compiled call.

        Equal to the three calls in a row; applied exactly once, like evolve (``idempotency_key`` as there). Returns
        ``{"version", "outputs", "dInputs"}`` by default, or the compartments named in ``returns``.
        Either tensor may be a ``Ref`` to a compartment already on the server.
        """
        return self.call("step", inputs=inputs, post=post, returns=returns, if_version=if_version,
                         idempotency_key=idempotency_key)

    def reset(self) -> None:
        """Zero the signal compartments at the configured batch_size; weights, biases and optimizer state stay."""
        self.call("reset")

    def call(self, operation: str, *, returns: Sequence[str] | None = None, if_version: int | None = None,
             idempotency_key: str | None = None, sequence: dict[str, Any] | None = None,
             **tensors: Any) -> dict[str, Any]:
        """Run any operation by name. Retried after a dropped connection only with an Idempotency-Key (over the
        network evolve and step always carry one), so a call is never run twice by accident. Tensors with a leading
        time axis ``(steps, batch, …)`` run ``steps`` steps in one call (``sequence``: ``{"every": k}`` or
        ``{"last": True}``; see ``run_sequence``)."""
        body = self.client._op_body(tensors, returns, sequence)
        headers = self.client._op_headers(operation, if_version, idempotency_key)
        return self.client.request("POST", self._url(f"/{quote(str(operation), safe='')}"), body,
                                   retry="Idempotency-Key" in headers, headers=headers)

    def run_sequence(self, operation: str, *, every: int | None = None, last: bool = False,
                     returns: Sequence[str] | None = None, if_version: int | None = None,
                     idempotency_key: str | None = None, progress: bool = False, **tensors: Any) -> dict[str, Any]:
        """Run ``operation`` over tensors with a leading time axis, ``(steps, batch, …)``: ``steps`` steps in one
        compiled call on the server, each equal to a separate call. Returns ``{"version", <compartment>: …}``
        with the compartments after every step (``(steps, batch, …)``), after every ``every``-th step
        (``(steps // every, batch, …)``), or after the last step alone (``last=True``: ``(batch, …)``).

        Example: ``ys = syn.run_sequence("forward", inputs=xs, every=10)["outputs"]``; ``syn.forward(xs)`` with
        ``xs`` of shape ``(steps, batch, …)`` returns every step's outputs.

        ``progress=True`` shows a bar: the sequence then runs as up to 20 consecutive calls of whole
        ``every``-step blocks (the same numbers; the answer joined), each advancing the bar.
        """
        options = self.client._sequence_options(every, last)
        if not progress:
            return self.call(operation, returns=returns, if_version=if_version, idempotency_key=idempotency_key,
                             sequence=options, **tensors)
        with _progress.SequenceInParts(f"{self.name} {operation}", tensors, every, if_version, idempotency_key) as run:
            answers = [self.call(operation, returns=returns, sequence=options, **part) for part in run.calls()]
        return _progress.join_answers(answers, last)

    def submit(self, operation: str, *, returns: Sequence[str] | None = None, if_version: int | None = None,
               idempotency_key: str | None = None, sequence: dict[str, Any] | None = None,
               **tensors: Any) -> Pending:
        """Send an operation without waiting for its answer; ``.result()`` gives it (on a session, several can be
        in flight: pipelining)."""
        body = self.client._op_body(tensors, returns, sequence)
        headers = self.client._op_headers(operation, if_version, idempotency_key)
        return self.client.submit("POST", self._url(f"/{quote(str(operation), safe='')}"), body,
                                  retry="Idempotency-Key" in headers, headers=headers)

    def help(self) -> dict[str, Any]:
        """Kind, hyperparameters (with this instance's values), compartments, dynamics."""
        return self.client.request("GET", self._url("/help"), retry=True)

    def describe(self) -> dict[str, Any]:
        """Config, compartment shapes, device, counters and version."""
        return self.client.request("GET", self._url(), retry=True)

    def plot_filters(self, path: str | os.PathLike[str] | None = None, *, compartment: str = "weights",
                     normalize: str = "tile", scale: int | None = None, columns: int | None = None,
                     tile: tuple[int, int] | None = None, padding: int | None = None) -> PNG:
        """The weights (or ``dWeights``, …) drawn by the server as a PNG grid of filter tiles; also written to
        ``path`` when given. In Jupyter the returned image displays itself.

        Filters: one tile per output channel (grey for 1 input channel, colour for 3) or per (c_in, c_out)
        filter; dense: each output unit's weights as a ``tile=(h, w)`` tile (default when ``n_in`` is a
        square), else the matrix as a heat map. ``normalize``: ``"tile"``, ``"global"`` or ``"symmetric"``
        (blue-white-red around zero); ``scale``: pixels per weight; ``columns``: tiles per row.
        """
        url = self._picture_url(compartment, normalize, scale, columns, tile, padding)
        answer = self.client.request("GET", url, retry=True, headers={"Accept": PNG_MEDIA})
        return self._picture(answer, path)

    def stats(self) -> dict[str, Any]:
        """Statistics now: ``weights`` (mean, std, min, max, norm, abs_mean, sparsity, filter_norms), ``update``
        (of dWeights) and ``biases``, with the version and counters they belong to."""
        return self.client.request("GET", self._url("/stats"), retry=True)

    def history(self) -> list[dict[str, Any]]:
        """The learning curve the server kept: one entry after each evolve or step call (a sequence: one, after
        its last step), oldest first, the last ``history_length`` of them (see ``describe()``). Each entry:
        ``version``, ``steps`` (updates so far), ``time``, the weights' mean, std, min, max, norm, sparsity and
        ``update_norm`` (of dWeights)."""
        return self.client.request("GET", self._url("/history"), retry=True)["entries"]

    def get(self, compartment: str, *, progress: bool = False) -> np.ndarray:
        """A copy of one compartment (writable, yours), e.g. ``"weights"`` or ``"opt_state/0/mu/0"``
        (``progress=True``: a bar while it downloads)."""
        return self.client.request("GET", self._url(f"/compartments/{_compartment_path(compartment)}"),
                                   retry=True, **_titled(progress, f"{self.name} {compartment}"))["value"]

    def set(self, compartment: str, value: Any, *, progress: bool = False) -> int:
        """Overwrite one compartment (same shape; batch may differ for signals); returns the new version
        (``progress=True``: a bar while it uploads)."""
        body = {"value": as_values(value, f"{compartment}: the value")}
        return self.client.request("PUT", self._url(f"/compartments/{_compartment_path(compartment)}"), body,
                                   retry=True, **_titled(progress, f"{self.name} {compartment}"))["version"]

    @property
    def weights(self) -> np.ndarray:
        """The current weights (a writable copy)."""
        return self.get("weights")

    def export(self, path: str | os.PathLike[str], *, progress: bool = False) -> Path:
        """Save the whole instance (config, compartments, optimizer state, counters) to one file
        (``progress=True``: a bar while it downloads)."""
        target = Path(path)
        target.write_bytes(self.client.request("GET", self._url("/export"), retry=True,
                                               **_titled(progress, f"{self.name} export")))
        return target

    def to_ngclearn(self, path: str | os.PathLike[str], *, layout: str = "component") -> Path:
        """Write the instance as ngclearn 3.2.3 files, from one consistent copy (its export).

        ``layout="component"``: ``<path>/<name>.npz`` and ``<name>_opt_params.pkl`` for ``syn.load(path)``;
        ``layout="model"``: ``<path>/<name>/`` for ``Context.load(path, name)``. Beside them,
        ``synapse-serve.json`` (provenance, the constructor call, notes on what ngclearn cannot restore) and
        ``load_in_ngclearn.py`` (``load_component`` / ``load_model``: restores everything ngclearn can hold, the
        optimizer state included). Returns the folder ngclearn reads. Docs: docs/ngclearn.md.
        """
        record, arrays = _ngclearn.read_export(self.client.request("GET", self._url("/export"), retry=True))
        return _ngclearn.write_ngclearn(Path(path), layout, self.name, record, arrays, record.get("provenance", {}))

    def delete(self) -> None:
        """Delete the instance (and its snapshots) on the server."""
        self.client.request("DELETE", self._url(), retry=False)

    def snapshot(self, snapshot: str) -> dict[str, Any]:
        """Take a named point-in-time copy (stored on the server's disk) to roll back to later."""
        return self.client.request("POST", self._url("/snapshots"), {"snapshot": check_name(snapshot, "snapshot")},
                                   retry=False)

    def snapshots(self) -> list[dict[str, Any]]:
        """The instance's snapshots (name, version, counters, time), oldest first."""
        return self.client.request("GET", self._url("/snapshots"), retry=True)["snapshots"]

    def restore(self, snapshot: str) -> int:
        """Roll every compartment back to ``snapshot``; returns the new version."""
        return self.client.request(
            "POST", self._url(f"/snapshots/{quote(check_name(snapshot, 'snapshot'), safe='')}/restore"),
            retry=False)["version"]

    def delete_snapshot(self, snapshot: str) -> None:
        """Delete one snapshot."""
        self.client.request("DELETE", self._url(f"/snapshots/{quote(check_name(snapshot, 'snapshot'), safe='')}"),
                            retry=False)


class AsyncSynapse(_Handle):
    """The asyncio twin of Synapse."""

    async def forward(self, inputs: Any) -> np.ndarray:
        """outputs = forward transform of ``inputs`` (see ``help()``); returns the outputs."""
        return (await self.call("forward", inputs=inputs))["outputs"]

    async def evolve(self, pre: Any, post: Any, *, returns: Sequence[str] = (), if_version: int | None = None,
                     idempotency_key: str | None = None) -> dict[str, Any]:
        """One Hebbian update, applied exactly once even when a dropped connection is retried (over the network it
        carries an Idempotency-Key: ``idempotency_key``, or a fresh one). ``if_version`` makes it fail with 412 if
        the version has moved."""
        return await self.call("evolve", pre=pre, post=post, returns=returns, if_version=if_version,
                               idempotency_key=idempotency_key)

    async def backtransmit(self, post: Any = None) -> np.ndarray:
        """dInputs = sign_value · the transform's adjoint at ``post`` (default: the stored post)."""
        return (await self.call("backtransmit", post=post))["dInputs"]

    async def step(self, inputs: Any, post: Any, *, returns: Sequence[str] | None = None,
                   if_version: int | None = None, idempotency_key: str | None = None) -> dict[str, Any]:
        """forward(inputs), evolve(pre=inputs, post), backtransmit(post) in one round trip and one compiled call.

        Equal to the three calls in a row; applied exactly once, like evolve (``idempotency_key`` as there)."""
        return await self.call("step", inputs=inputs, post=post, returns=returns, if_version=if_version,
                               idempotency_key=idempotency_key)

    async def reset(self) -> None:
        """Zero the signal compartments at the configured batch_size; weights, biases and optimizer state stay."""
        await self.call("reset")

    async def call(self, operation: str, *, returns: Sequence[str] | None = None, if_version: int | None = None,
                   idempotency_key: str | None = None, sequence: dict[str, Any] | None = None,
                   **tensors: Any) -> dict[str, Any]:
        """Run any operation by name. Retried after a dropped connection only with an Idempotency-Key (over the
        network evolve and step always carry one), so a call is never run twice by accident. Tensors with a leading
        time axis run a sequence (see ``run_sequence``)."""
        body = self.client._op_body(tensors, returns, sequence)
        headers = self.client._op_headers(operation, if_version, idempotency_key)
        return await self.client.request("POST", self._url(f"/{quote(str(operation), safe='')}"), body,
                                         retry="Idempotency-Key" in headers, headers=headers)

    async def run_sequence(self, operation: str, *, every: int | None = None, last: bool = False,
                           returns: Sequence[str] | None = None, if_version: int | None = None,
                           idempotency_key: str | None = None, progress: bool = False,
                           **tensors: Any) -> dict[str, Any]:
        """``steps`` steps of ``operation`` in one call, over tensors ``(steps, batch, …)`` (see
        ``Synapse.run_sequence``; ``progress=True``: a bar, the steps in up to 20 calls)."""
        options = self.client._sequence_options(every, last)
        if not progress:
            return await self.call(operation, returns=returns, if_version=if_version,
                                   idempotency_key=idempotency_key, sequence=options, **tensors)
        with _progress.SequenceInParts(f"{self.name} {operation}", tensors, every, if_version, idempotency_key) as run:
            answers = [await self.call(operation, returns=returns, sequence=options, **part) for part in run.calls()]
        return _progress.join_answers(answers, last)

    def submit(self, operation: str, *, returns: Sequence[str] | None = None, if_version: int | None = None,
               idempotency_key: str | None = None, sequence: dict[str, Any] | None = None,
               **tensors: Any) -> asyncio.Task:
        """Send an operation now; await the returned task for its answer (concurrent calls are pipelined)."""
        body = self.client._op_body(tensors, returns, sequence)
        headers = self.client._op_headers(operation, if_version, idempotency_key)
        return self.client.submit("POST", self._url(f"/{quote(str(operation), safe='')}"), body,
                                  retry="Idempotency-Key" in headers, headers=headers)

    async def help(self) -> dict[str, Any]:
        """Kind, hyperparameters (with this instance's values), compartments, dynamics."""
        return await self.client.request("GET", self._url("/help"), retry=True)

    async def describe(self) -> dict[str, Any]:
        """Config, compartment shapes, device, counters and version."""
        return await self.client.request("GET", self._url(), retry=True)

    async def plot_filters(self, path: str | os.PathLike[str] | None = None, *, compartment: str = "weights",
                           normalize: str = "tile", scale: int | None = None, columns: int | None = None,
                           tile: tuple[int, int] | None = None, padding: int | None = None) -> PNG:
        """The weights drawn by the server as a PNG grid (see ``Synapse.plot_filters``); also written to ``path``."""
        url = self._picture_url(compartment, normalize, scale, columns, tile, padding)
        answer = await self.client.request("GET", url, retry=True, headers={"Accept": PNG_MEDIA})
        return self._picture(answer, path)

    async def stats(self) -> dict[str, Any]:
        """Statistics now: ``weights`` (mean, std, min, max, norm, abs_mean, sparsity, filter_norms), ``update``
        (of dWeights) and ``biases``, with the version and counters they belong to."""
        return await self.client.request("GET", self._url("/stats"), retry=True)

    async def history(self) -> list[dict[str, Any]]:
        """The learning curve the server kept: one entry after each evolve or step call (a sequence: one, after
        its last step), oldest first, the last ``history_length`` of them (see ``describe()``). Each entry:
        ``version``, ``steps`` (updates so far), ``time``, the weights' mean, std, min, max, norm, sparsity and
        ``update_norm`` (of dWeights)."""
        return (await self.client.request("GET", self._url("/history"), retry=True))["entries"]

    async def get(self, compartment: str, *, progress: bool = False) -> np.ndarray:
        """A copy of one compartment (writable, yours), e.g. ``"weights"`` (``progress=True``: a bar)."""
        return (await self.client.request("GET", self._url(f"/compartments/{_compartment_path(compartment)}"),
                                          retry=True, **_titled(progress, f"{self.name} {compartment}")))["value"]

    async def set(self, compartment: str, value: Any, *, progress: bool = False) -> int:
        """Overwrite one compartment; returns the new version (``progress=True``: a bar)."""
        body = {"value": as_values(value, f"{compartment}: the value")}
        return (await self.client.request("PUT", self._url(f"/compartments/{_compartment_path(compartment)}"),
                                          body, retry=True, **_titled(progress, f"{self.name} {compartment}"))
                )["version"]

    @property
    async def weights(self) -> np.ndarray:
        """The current weights (a writable copy): ``await syn.weights``."""
        return await self.get("weights")

    async def export(self, path: str | os.PathLike[str], *, progress: bool = False) -> Path:
        """Save the whole instance (config, compartments, optimizer state, counters) to one file
        (``progress=True``: a bar while it downloads)."""
        target = Path(path)
        target.write_bytes(await self.client.request("GET", self._url("/export"), retry=True,
                                                     **_titled(progress, f"{self.name} export")))
        return target

    async def to_ngclearn(self, path: str | os.PathLike[str], *, layout: str = "component") -> Path:
        """Write the instance as ngclearn 3.2.3 files (see ``Synapse.to_ngclearn``)."""
        record, arrays = _ngclearn.read_export(await self.client.request("GET", self._url("/export"), retry=True))
        return _ngclearn.write_ngclearn(Path(path), layout, self.name, record, arrays, record.get("provenance", {}))

    async def delete(self) -> None:
        """Delete the instance (and its snapshots) on the server."""
        await self.client.request("DELETE", self._url(), retry=False)

    async def snapshot(self, snapshot: str) -> dict[str, Any]:
        """Take a named point-in-time copy (stored on the server's disk) to roll back to later."""
        return await self.client.request("POST", self._url("/snapshots"),
                                         {"snapshot": check_name(snapshot, "snapshot")}, retry=False)

    async def snapshots(self) -> list[dict[str, Any]]:
        """The instance's snapshots (name, version, counters, time), oldest first."""
        return (await self.client.request("GET", self._url("/snapshots"), retry=True))["snapshots"]

    async def restore(self, snapshot: str) -> int:
        """Roll every compartment back to ``snapshot``; returns the new version."""
        return (await self.client.request(
            "POST", self._url(f"/snapshots/{quote(check_name(snapshot, 'snapshot'), safe='')}/restore"),
            retry=False))["version"]

    async def delete_snapshot(self, snapshot: str) -> None:
        """Delete one snapshot."""
        await self.client.request(
            "DELETE", self._url(f"/snapshots/{quote(check_name(snapshot, 'snapshot'), safe='')}"), retry=False)
