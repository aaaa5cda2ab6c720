"""The in-process mode: ``SynapseClient("local")`` runs the engine in this process, with the same API.

The handles make the same REST-shaped requests; here each becomes a frame (``_frames.py``) run
by the server's own dispatcher and backend in this process (``synapse_serve.inprocess``): the
same checks, errors and numbers, no HTTP. It needs the server's dependencies (JAX): install
``synapse-serve[server]``. ``"local"`` keeps instances in memory; ``"local:<directory>"`` keeps
them in a state directory, as a server would (``SynapseClient("local:state")``, then
``synapse-serve --state-dir state`` serves the same instances once the client is closed).
"""

from __future__ import annotations

from typing import Any

from synapse_client._codec import copied  # answers: writable arrays nothing in the engine shares
from synapse_client._exceptions import APIConnectionError
from synapse_client._frames import frame_of, result_of
from synapse_client._session import HandleHost

SERVER_EXTRA = ("SynapseClient('local') runs the engine in this process and needs the server's dependencies "
                "(JAX, FastAPI): pip install 'synapse-serve[server]'; or pass a server's URL")


def is_local(base_url: str) -> bool:
    """Whether a client address names the in-process engine (``"local"`` or ``"local:<state directory>"``)."""
    return base_url == "local" or base_url.startswith("local:")


def _engine(base_url: str, asynchronous: bool, settings: dict[str, Any]) -> Any:
    try:
        from synapse_serve.inprocess import Engine
    except ImportError as exc:
        raise ImportError(f"{SERVER_EXTRA} ({exc})") from None
    state_dir = base_url.partition(":")[2] or None
    settings = dict(settings)
    given = settings.pop("state_dir", None)  # a setting like any other: "local" with it is "local:<it>"
    if given is not None and state_dir is not None and str(given) != state_dir:
        raise ValueError(f"local_settings state_dir {str(given)!r} and the address {base_url!r} name two state "
                         "directories; give one")
    return Engine(state_dir or given, in_caller_thread=not asynchronous, **settings)


class LocalTransport:
    """What a blocking client sends through in the in-process mode."""

    def __init__(self, base_url: str, settings: dict[str, Any]) -> None:
        self.engine = _engine(base_url, False, settings)

    def request(self, method: str, path: str, body: Any, headers: dict[str, str] | None) -> Any:
        frame = frame_of(method, path, body, headers)  # its values made what the wire makes them: Engine._as_sent
        if frame is None:
            if method == "GET" and path in ("/healthz", "/readyz"):
                return {"status": "ok" if self.engine.ready else "starting"}
            raise ValueError(f"{method} {path} has no in-process equivalent")
        return copied(result_of(self.engine.run(frame)))

    def close(self) -> None:
        self.engine.close()


class AsyncLocalTransport:
    """What an asyncio client sends through in the in-process mode (calls awaited on the caller's loop)."""

    def __init__(self, base_url: str, settings: dict[str, Any]) -> None:
        self.engine = _engine(base_url, True, settings)

    async def request(self, method: str, path: str, body: Any, headers: dict[str, str] | None) -> Any:
        frame = frame_of(method, path, body, headers)  # its values made what the wire makes them: Engine._as_sent
        if frame is None:
            if method == "GET" and path in ("/healthz", "/readyz"):
                return {"status": "ok" if self.engine.ready else "starting"}
            raise ValueError(f"{method} {path} has no in-process equivalent")
        return copied(result_of(await self.engine.arun(frame)))

    async def close(self) -> None:
        await self.engine.aclose()


class LocalSession(HandleHost):
    """``client.session()`` in the in-process mode: calls are direct already; its handles make the client's calls
    until the session is closed, and raise APIConnectionError after, as a network session's do."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.base_url = client.base_url
        self._closed = False

    def _open_client(self, op: str) -> Any:
        if self._closed:
            raise APIConnectionError(f"session at {self.base_url}: {op}: the session is closed")
        return self.client

    # --- what handles call (and HandleHost's) ---

    def request(self, method: str, path: str, body: Any = None, **options: Any) -> Any:
        return self._open_client(f"{method} {path}").request(method, path, body, **options)

    def submit(self, method: str, path: str, body: Any = None, **options: Any) -> Any:
        return self._open_client(f"{method} {path}").submit(method, path, body, **options)

    # --- the session's own calls ---

    def get(self, name: str, *, owner: str | None = None) -> Any:
        """The handle of an existing instance, its calls through this session (NotFoundError if there is none)."""
        from synapse_client._client import Synapse

        handle = Synapse(self, name, owner=owner)
        handle.describe()
        return handle

    def call_many(self, operation: str, calls: Any, **options: Any) -> dict[str, dict[str, Any]]:
        """One operation on many instances (see ``SynapseClient.call_many``)."""
        return self._open_client("call_many").call_many(operation, calls, **options)

    def call_stacked(self, operation: str, names: Any, tensors: dict[str, Any], **options: Any) -> dict[str, Any]:
        """One operation on a population (see ``SynapseClient.call_stacked``)."""
        return self._open_client("call_stacked").call_stacked(operation, names, tensors, **options)

    def close(self) -> None:
        """Later calls through the session raise APIConnectionError; the client stays open."""
        self._closed = True

    def __enter__(self) -> LocalSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncLocalSession(LocalSession):
    """The asyncio twin of LocalSession."""

    async def request(self, method: str, path: str, body: Any = None, **options: Any) -> Any:
        return await self._open_client(f"{method} {path}").request(method, path, body, **options)

    async def get(self, name: str, *, owner: str | None = None) -> Any:
        """The handle of an existing instance, its calls through this session (NotFoundError if there is none)."""
        from synapse_client._client import AsyncSynapse

        handle = AsyncSynapse(self, name, owner=owner)
        await handle.describe()
        return handle

    async def call_many(self, operation: str, calls: Any, **options: Any) -> dict[str, dict[str, Any]]:
        """One operation on many instances (see ``SynapseClient.call_many``)."""
        return await self._open_client("call_many").call_many(operation, calls, **options)

    async def call_stacked(self, operation: str, names: Any, tensors: dict[str, Any], **options: Any
                           ) -> dict[str, Any]:
        """One operation on a population (see ``SynapseClient.call_stacked``)."""
        return await self._open_client("call_stacked").call_stacked(operation, names, tensors, **options)

    async def close(self) -> None:  # type: ignore[override]
        """Later calls through the session raise APIConnectionError; the client stays open."""
        self._closed = True

    async def __aenter__(self) -> AsyncLocalSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
