"""``SynapseClient`` and ``AsyncSynapseClient``: twins that mirror each other line for line.

``_BaseClient`` holds everything without I/O (URLs, headers, encoding, errors,
retry policy); the two subclasses only send. A handle per instance
(``Synapse`` / ``AsyncSynapse``) carries the operations.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np

from synapse_client import _codec
from synapse_client._codec import Ref
from synapse_client._exceptions import APIConnectionError, APITimeoutError, SynapseError, WireError, status_error

MSGPACK = "application/msgpack"
OCTET = "application/octet-stream"
DEFAULT_TIMEOUT = httpx.Timeout(connect=5.0, read=120.0, write=120.0, pool=10.0)
DEFAULT_URL = "http://127.0.0.1:8000"
LEARNING_OPERATIONS = ("evolve", "step")  # not repeatable by accident: sent with an Idempotency-Key


def as_array(value: Any) -> np.ndarray | Ref:
    """numpy from numpy, jax arrays or nested lists; float64 is sent as float32 (the state's dtype).

    A ``Ref`` passes through: it is sent as a reference, not as values.
    """
    if isinstance(value, Ref):
        return value
    array = np.asarray(value)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    return array


class _BaseClient:
    def __init__(self, base_url: str, timeout: float | httpx.Timeout | None, max_retries: int,
                 headers: dict[str, str] | None, token: str | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = DEFAULT_TIMEOUT if timeout is None else (
            timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout))
        self.max_retries = max_retries
        self.headers = {"Accept": MSGPACK, "User-Agent": "synapse-client/0.1", **(headers or {})}
        token = token if token is not None else os.environ.get("SYNAPSE_TOKEN")
        if token:
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
    def _decode(response: httpx.Response) -> Any:
        media = response.headers.get("content-type", "").split(";")[0].strip()
        if response.status_code >= 400:
            try:
                problem = json.loads(response.content) if "json" in media else _codec.unpackb(response.content)
            except (ValueError, WireError):
                problem = {"detail": response.text[:500]}
            if not isinstance(problem, dict):
                problem = {"detail": str(problem)[:500]}
            raise status_error(response.status_code, problem, response.headers.get("x-request-id"))
        if response.status_code == 204 or not response.content:
            return None
        if media == OCTET:
            return response.content
        if media == MSGPACK:
            return _codec.unpackb(response.content)
        return response.json()

    @staticmethod
    def _connection_error(method: str, path: str, exc: httpx.TransportError) -> APIConnectionError:
        if isinstance(exc, httpx.TimeoutException):
            return APITimeoutError(f"{method} {path}: timed out ({exc})", exc.request)
        return APIConnectionError(f"{method} {path}: {type(exc).__name__}: {exc}", exc.request)

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter: 0.25 s, 0.5 s, 1 s, … capped at 8 s."""
        return min(8.0, 0.25 * 2**attempt) * (0.5 + random.random() / 2)

    @staticmethod
    def _op_headers(operation: str, if_version: int | None, idempotency_key: str | None) -> dict[str, str]:
        """evolve and step always carry an Idempotency-Key (kept across retries): retrying them is safe."""
        headers = {}
        if idempotency_key is None and operation in LEARNING_OPERATIONS:
            idempotency_key = uuid.uuid4().hex
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        if if_version is not None:
            headers["If-Match"] = f'"{if_version}"'
        return headers

    @staticmethod
    def _op_body(tensors: dict[str, Any], returns: Sequence[str] | None) -> dict[str, Any]:
        body = {k: as_array(v) for k, v in tensors.items() if v is not None}
        if returns is not None:
            body["return"] = list(returns)
        return body

    @staticmethod
    def _create_body(name: str, kind: str, config: dict[str, Any], init: dict[str, Any] | None,
                     seed: int, durability: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "kind": kind, "config": dict(config), "seed": seed}
        if durability is not None:
            body["durability"] = durability
        if init:
            body["init"] = {k: as_array(v) for k, v in init.items()}
        return body


async def _stream(parts: list[bytes | memoryview]):
    """Body parts for httpx's AsyncClient (which takes only async iterables); a fresh one per attempt."""
    for part in parts:
        yield part


def _unwrap(result: dict[str, Any], key: str) -> np.ndarray:
    return result[key]


class SynapseClient(_BaseClient):
    """Blocking client. Use as a context manager, or call ``close()``.

    ``token`` (default: the ``SYNAPSE_TOKEN`` environment variable) is sent as a bearer token.

    Example::

        with SynapseClient("http://127.0.0.1:8000") as client:
            syn = client.create("enc", kind="HebbianDeconvSynapse",
                                config={"shape": [3, 3, 1, 4], "x_shape": [8, 8], "eta": 0.01})
            y = syn.forward(x)
    """

    def __init__(self, base_url: str = DEFAULT_URL, *, timeout: float | httpx.Timeout | None = None,
                 max_retries: int = 2, headers: dict[str, str] | None = None, token: str | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(base_url, timeout, max_retries, headers, token)
        self._http = httpx.Client(base_url=self.base_url, timeout=self.timeout, headers=self.headers,
                                  transport=transport)

    def request(self, method: str, path: str, body: dict[str, Any] | bytes | None = None, *, retry: bool,
                headers: dict[str, str] | None = None) -> Any:
        """Send one call. ``retry=True`` only for calls safe to repeat: connection errors are then retried."""
        content, content_headers = self._prepare(body)
        headers = {**content_headers, **(headers or {})}
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, content=content, headers=headers)
            except httpx.TransportError as exc:
                error = self._connection_error(method, path, exc)
            else:
                return self._decode(response)
            if not retry or attempt >= self.max_retries:
                raise error
            time.sleep(self._backoff(attempt))
            attempt += 1

    def create(self, name: str, *, kind: str, config: dict[str, Any], init: dict[str, Any] | None = None,
               seed: int = 0, durability: str | None = None) -> Synapse:
        """Create a named instance and return its handle (never retried: a retry could meet its own 409).

        ``durability`` (``"sync"``, ``"interval"``, ``"off"``) overrides the server's mode for this instance.
        """
        body = self._create_body(name, kind, config, init, seed, durability)
        self.request("POST", "/v1/synapses", body, retry=False)
        return Synapse(self, name)

    def get(self, name: str) -> Synapse:
        """The handle of an existing instance (NotFoundError if there is none)."""
        self.request("GET", f"/v1/synapses/{name}", retry=True)
        return Synapse(self, name)

    def import_(self, path: str | os.PathLike[str], *, name: str) -> Synapse:
        """Create instance ``name`` from a file written by ``Synapse.export`` (bit-identical state)."""
        self.request("POST", f"/v1/synapses/import?name={quote(name, safe='')}", Path(path).read_bytes(),
                     retry=False)
        return Synapse(self, name)

    def list(self) -> list[dict[str, Any]]:
        """Descriptions of every instance."""
        return self.request("GET", "/v1/synapses", retry=True)["synapses"]

    def kinds(self) -> list[dict[str, Any]]:
        """The synapse kinds the server offers."""
        return self.request("GET", "/v1/kinds", retry=True)["kinds"]

    def kind_help(self, kind: str) -> dict[str, Any]:
        """A kind's help: hyperparameters, compartments, dynamics."""
        return self.request("GET", f"/v1/kinds/{kind}", retry=True)

    def health(self) -> bool:
        """True when the server is live and ready."""
        try:
            self.request("GET", "/readyz", retry=False)
            return True
        except SynapseError:
            return False

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

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
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(base_url, timeout, max_retries, headers, token)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout, headers=self.headers,
                                       transport=transport)

    async def request(self, method: str, path: str, body: dict[str, Any] | bytes | None = None, *,
                      retry: bool, headers: dict[str, str] | None = None) -> Any:
        """Send one call. ``retry=True`` only for calls safe to repeat: connection errors are then retried."""
        content, content_headers = self._prepare(body)
        headers = {**content_headers, **(headers or {})}
        attempt = 0
        while True:
            try:
                response = await self._http.request(
                    method, path, content=_stream(content) if isinstance(content, list) else content,
                    headers=headers)
            except httpx.TransportError as exc:
                error = self._connection_error(method, path, exc)
            else:
                return self._decode(response)
            if not retry or attempt >= self.max_retries:
                raise error
            await asyncio.sleep(self._backoff(attempt))
            attempt += 1

    async def create(self, name: str, *, kind: str, config: dict[str, Any], init: dict[str, Any] | None = None,
                     seed: int = 0, durability: str | None = None) -> AsyncSynapse:
        """Create a named instance and return its handle (never retried: a retry could meet its own 409).

        ``durability`` (``"sync"``, ``"interval"``, ``"off"``) overrides the server's mode for this instance.
        """
        body = self._create_body(name, kind, config, init, seed, durability)
        await self.request("POST", "/v1/synapses", body, retry=False)
        return AsyncSynapse(self, name)

    async def get(self, name: str) -> AsyncSynapse:
        """The handle of an existing instance (NotFoundError if there is none)."""
        await self.request("GET", f"/v1/synapses/{name}", retry=True)
        return AsyncSynapse(self, name)

    async def import_(self, path: str | os.PathLike[str], *, name: str) -> AsyncSynapse:
        """Create instance ``name`` from a file written by ``AsyncSynapse.export`` (bit-identical state)."""
        await self.request("POST", f"/v1/synapses/import?name={quote(name, safe='')}", Path(path).read_bytes(),
                           retry=False)
        return AsyncSynapse(self, name)

    async def list(self) -> list[dict[str, Any]]:
        """Descriptions of every instance."""
        return (await self.request("GET", "/v1/synapses", retry=True))["synapses"]

    async def kinds(self) -> list[dict[str, Any]]:
        """The synapse kinds the server offers."""
        return (await self.request("GET", "/v1/kinds", retry=True))["kinds"]

    async def kind_help(self, kind: str) -> dict[str, Any]:
        """A kind's help: hyperparameters, compartments, dynamics."""
        return await self.request("GET", f"/v1/kinds/{kind}", retry=True)

    async def health(self) -> bool:
        """True when the server is live and ready."""
        try:
            await self.request("GET", "/readyz", retry=False)
            return True
        except SynapseError:
            return False

    async def close(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncSynapseClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Synapse:
    """Handle of one named instance on the server; numpy in, numpy out."""

    def __init__(self, client: SynapseClient, name: str) -> None:
        self.client, self.name = client, name
        self._path = f"/v1/synapses/{name}"

    def forward(self, inputs: Any) -> np.ndarray:
        """outputs = conv_transpose(inputs, W) * g + b; inputs (batch, h, w, c_in)."""
        return _unwrap(self.call("forward", inputs=inputs), "outputs")

    def evolve(self, pre: Any, post: Any, *, returns: Sequence[str] = (),
               if_version: int | None = None) -> dict[str, Any]:
        """One Hebbian update of the filters, applied exactly once even when a dropped connection is retried
        (it carries an Idempotency-Key). ``if_version`` makes it fail with 412 if the version has moved.

        Returns ``{"version": …}`` plus any compartments named in ``returns`` (e.g. ``("dWeights",)``).
        """
        return self.call("evolve", pre=pre, post=post, returns=returns, if_version=if_version)

    def backtransmit(self, post: Any = None) -> np.ndarray:
        """dInputs = sign_value · VJP of forward w.r.t. inputs at ``post`` (default: the stored post)."""
        return _unwrap(self.call("backtransmit", post=post), "dInputs")

    def step(self, inputs: Any, post: Any, *, returns: Sequence[str] | None = None,
             if_version: int | None = None) -> dict[str, Any]:
        """forward(inputs), evolve(pre=inputs, post), backtransmit(post) in one round trip and one compiled call.

        Equal to the three calls in a row; applied exactly once, like evolve. Returns
        ``{"version", "outputs", "dInputs"}`` by default, or the compartments named in ``returns``.
        Either tensor may be a ``Ref`` to a compartment already on the server.
        """
        return self.call("step", inputs=inputs, post=post, returns=returns, if_version=if_version)

    def reset(self) -> None:
        """Zero inputs, outputs, pre, post and dInputs; weights, biases and optimizer state stay."""
        self.call("reset")

    def call(self, operation: str, *, returns: Sequence[str] | None = None, if_version: int | None = None,
             idempotency_key: str | None = None, **tensors: Any) -> dict[str, Any]:
        """Run any operation by name; connection errors are retried (evolve with its Idempotency-Key)."""
        body = self.client._op_body(tensors, returns)
        headers = self.client._op_headers(operation, if_version, idempotency_key)
        return self.client.request("POST", f"{self._path}/{operation}", body, retry=True, headers=headers)

    def help(self) -> dict[str, Any]:
        """Kind, hyperparameters (with this instance's values), compartments, dynamics."""
        return self.client.request("GET", f"{self._path}/help", retry=True)

    def describe(self) -> dict[str, Any]:
        """Config, compartment shapes, device, counters and version."""
        return self.client.request("GET", self._path, retry=True)

    def get(self, compartment: str) -> np.ndarray:
        """A copy of one compartment, e.g. ``"weights"`` or ``"opt_state/0/mu/0"``."""
        return self.client.request("GET", f"{self._path}/compartments/{compartment}", retry=True)["value"]

    def set(self, compartment: str, value: Any) -> int:
        """Overwrite one compartment (same shape; batch may differ for signals); returns the new version."""
        body = {"value": as_array(value)}
        return self.client.request("PUT", f"{self._path}/compartments/{compartment}", body, retry=True)["version"]

    @property
    def weights(self) -> np.ndarray:
        """The current filters (kh, kw, c_in, c_out)."""
        return self.get("weights")

    def export(self, path: str | os.PathLike[str]) -> Path:
        """Save the whole instance (config, compartments, optimizer state, counters) to one file."""
        target = Path(path)
        target.write_bytes(self.client.request("GET", f"{self._path}/export", retry=True))
        return target

    def delete(self) -> None:
        """Delete the instance on the server."""
        self.client.request("DELETE", self._path, retry=False)

    def snapshot(self, snapshot: str) -> dict[str, Any]:
        """Take a named point-in-time copy (stored on the server's disk) to roll back to later."""
        return self.client.request("POST", f"{self._path}/snapshots", {"snapshot": snapshot}, retry=False)

    def snapshots(self) -> list[dict[str, Any]]:
        """The instance's snapshots (name, version, counters, time), oldest first."""
        return self.client.request("GET", f"{self._path}/snapshots", retry=True)["snapshots"]

    def restore(self, snapshot: str) -> int:
        """Roll every compartment back to ``snapshot``; returns the new version."""
        return self.client.request("POST", f"{self._path}/snapshots/{snapshot}/restore", retry=True)["version"]

    def delete_snapshot(self, snapshot: str) -> None:
        """Delete one snapshot."""
        self.client.request("DELETE", f"{self._path}/snapshots/{snapshot}", retry=False)

    def __repr__(self) -> str:
        return f"Synapse({self.name!r} at {self.client.base_url})"


class AsyncSynapse:
    """The asyncio twin of Synapse."""

    def __init__(self, client: AsyncSynapseClient, name: str) -> None:
        self.client, self.name = client, name
        self._path = f"/v1/synapses/{name}"

    async def forward(self, inputs: Any) -> np.ndarray:
        """outputs = conv_transpose(inputs, W) * g + b; inputs (batch, h, w, c_in)."""
        return _unwrap(await self.call("forward", inputs=inputs), "outputs")

    async def evolve(self, pre: Any, post: Any, *, returns: Sequence[str] = (),
                     if_version: int | None = None) -> dict[str, Any]:
        """One Hebbian update of the filters, applied exactly once even when a dropped connection is retried
        (it carries an Idempotency-Key). ``if_version`` makes it fail with 412 if the version has moved."""
        return await self.call("evolve", pre=pre, post=post, returns=returns, if_version=if_version)

    async def backtransmit(self, post: Any = None) -> np.ndarray:
        """dInputs = sign_value · VJP of forward w.r.t. inputs at ``post`` (default: the stored post)."""
        return _unwrap(await self.call("backtransmit", post=post), "dInputs")

    async def step(self, inputs: Any, post: Any, *, returns: Sequence[str] | None = None,
                   if_version: int | None = None) -> dict[str, Any]:
        """forward(inputs), evolve(pre=inputs, post), backtransmit(post) in one round trip and one compiled call.

        Equal to the three calls in a row; applied exactly once, like evolve."""
        return await self.call("step", inputs=inputs, post=post, returns=returns, if_version=if_version)

    async def reset(self) -> None:
        """Zero inputs, outputs, pre, post and dInputs; weights, biases and optimizer state stay."""
        await self.call("reset")

    async def call(self, operation: str, *, returns: Sequence[str] | None = None, if_version: int | None = None,
                   idempotency_key: str | None = None, **tensors: Any) -> dict[str, Any]:
        """Run any operation by name; connection errors are retried (evolve with its Idempotency-Key)."""
        body = self.client._op_body(tensors, returns)
        headers = self.client._op_headers(operation, if_version, idempotency_key)
        return await self.client.request("POST", f"{self._path}/{operation}", body, retry=True, headers=headers)

    async def help(self) -> dict[str, Any]:
        """Kind, hyperparameters (with this instance's values), compartments, dynamics."""
        return await self.client.request("GET", f"{self._path}/help", retry=True)

    async def describe(self) -> dict[str, Any]:
        """Config, compartment shapes, device, counters and version."""
        return await self.client.request("GET", self._path, retry=True)

    async def get(self, compartment: str) -> np.ndarray:
        """A copy of one compartment, e.g. ``"weights"``."""
        return (await self.client.request("GET", f"{self._path}/compartments/{compartment}", retry=True))["value"]

    async def set(self, compartment: str, value: Any) -> int:
        """Overwrite one compartment; returns the new version."""
        body = {"value": as_array(value)}
        return (await self.client.request("PUT", f"{self._path}/compartments/{compartment}", body, retry=True))[
            "version"]

    @property
    async def weights(self) -> np.ndarray:
        """The current filters (kh, kw, c_in, c_out): ``await syn.weights``."""
        return await self.get("weights")

    async def export(self, path: str | os.PathLike[str]) -> Path:
        """Save the whole instance (config, compartments, optimizer state, counters) to one file."""
        target = Path(path)
        target.write_bytes(await self.client.request("GET", f"{self._path}/export", retry=True))
        return target

    async def delete(self) -> None:
        """Delete the instance on the server."""
        await self.client.request("DELETE", self._path, retry=False)

    async def snapshot(self, snapshot: str) -> dict[str, Any]:
        """Take a named point-in-time copy (stored on the server's disk) to roll back to later."""
        return await self.client.request("POST", f"{self._path}/snapshots", {"snapshot": snapshot}, retry=False)

    async def snapshots(self) -> list[dict[str, Any]]:
        """The instance's snapshots (name, version, counters, time), oldest first."""
        return (await self.client.request("GET", f"{self._path}/snapshots", retry=True))["snapshots"]

    async def restore(self, snapshot: str) -> int:
        """Roll every compartment back to ``snapshot``; returns the new version."""
        return (await self.client.request("POST", f"{self._path}/snapshots/{snapshot}/restore", retry=True))[
            "version"]

    async def delete_snapshot(self, snapshot: str) -> None:
        """Delete one snapshot."""
        await self.client.request("DELETE", f"{self._path}/snapshots/{snapshot}", retry=False)

    def __repr__(self) -> str:
        return f"AsyncSynapse({self.name!r} at {self.client.base_url})"
