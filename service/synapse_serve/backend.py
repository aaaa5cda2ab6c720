"""The backend interface: everything the API may ask of wherever the instances live.

The API (``api/``) reaches instances only through this Protocol: async methods with keyword
arguments, plain values in and out (numpy arrays for tensors, dicts for descriptions), domain
errors from ``errors.py``. ``local/backend.py`` implements it in this process on the JAX devices
it sees; a cluster backend implements the same methods, so the API, the client and every
guarantee stay the same. No JAX here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import numpy as np

from synapse_serve.names import InstanceKey

ExportParts = tuple[int, Callable[[], Iterator[bytes | memoryview]]]  # the file's length, and its parts


class Backend(Protocol):
    """Named synapse instances and their operations (see docs/api.md for the semantics of each)."""

    # --- lifecycle ---

    async def start(self) -> None:
        """Take the state, before the server accepts requests (quick: e.g. lock it and list what is stored)."""

    async def get_ready(self, phase: Callable[[str], None]) -> None:
        """Restore stored instances, warm up, start background work; report each phase by calling ``phase``."""

    async def probe(self) -> dict[str, Any] | None:
        """Raise if a device cannot compute now (readiness); anything else readiness should say (a cluster: how
        many shards are up)."""

    async def close(self) -> None:
        """Graceful shutdown: write what changed, release the state."""

    def storage_error(self) -> str | None:
        """The last storage failure while writes still fail (health), else None."""

    # --- kinds ---

    def kinds(self) -> list[dict[str, Any]]:
        """Every kind: name, description, operations and help."""

    def kind_help(self, kind: str) -> dict[str, Any]:
        """A kind's help (NotFound for an unknown kind)."""

    def operation_names(self) -> frozenset[str]:
        """Every operation of every kind (for routing and metrics labels)."""

    # --- instances ---

    async def create(self, key: InstanceKey, *, kind: str, config: Mapping[str, Any],
                     init: Mapping[str, Any] | None = None, seed: int = 0, durability: str | None = None,
                     device: str | int | None = None) -> dict[str, Any]: ...

    async def describe(self, key: InstanceKey) -> dict[str, Any]: ...

    async def help(self, key: InstanceKey) -> dict[str, Any]: ...

    async def stats(self, key: InstanceKey) -> dict[str, Any]:
        """Statistics of the weights (per filter too), the last update and the biases, now."""

    async def history(self, key: InstanceKey) -> dict[str, Any]:
        """The samples of those statistics kept after each learning call (bounded), oldest first."""

    async def list(self, *, owner: str | None) -> list[dict[str, Any]]: ...

    async def delete(self, key: InstanceKey, *, expected_version: int | None = None) -> None: ...

    async def call(self, key: InstanceKey, *, operation: str, tensors: Mapping[str, Any],
                   returns: list[str] | None = None, idempotency_key: str | None = None,
                   expected_version: int | None = None, sequence: Mapping[str, Any] | None = None
                   ) -> dict[str, Any]:
        """Run an operation; tensors with a leading time axis run it as a sequence of steps in one call
        (``sequence``: ``every``, ``last``)."""

    async def call_many(self, keys: list[InstanceKey], *, operation: str, tensors: list[Mapping[str, Any]],
                        returns: list[str] | None = None, idempotency_key: str | None = None
                        ) -> list[dict[str, Any]]:
        """One operation on many instances (one owner's): all applied or none, each answer a separate call's."""

    async def call_stacked(self, keys: list[InstanceKey], *, operation: str, tensors: Mapping[str, Any],
                           returns: list[str] | None = None, idempotency_key: str | None = None) -> dict[str, Any]:
        """``call_many`` with each tensor stacked along a leading instance axis; answers ``{"versions": […],
        <compartment>: stacked, …}`` (the instances must agree on the shapes they return)."""

    async def read(self, key: InstanceKey, *, compartment: str) -> tuple[np.ndarray, int]: ...

    async def write(self, key: InstanceKey, *, compartment: str, value: Any,
                    expected_version: int | None = None) -> int: ...

    # --- files ---

    async def export(self, key: InstanceKey) -> ExportParts: ...

    async def import_(self, key: InstanceKey, *, blob: bytes) -> dict[str, Any]: ...

    async def snapshot(self, key: InstanceKey, *, snapshot: str) -> dict[str, Any]: ...

    async def snapshots(self, key: InstanceKey) -> list[dict[str, Any]]: ...

    async def rollback(self, key: InstanceKey, *, snapshot: str, expected_version: int | None = None) -> int: ...

    async def delete_snapshot(self, key: InstanceKey, *, snapshot: str) -> None: ...

    async def evicted(self, *, owner: str) -> list[dict[str, Any]]: ...

    async def unevict(self, key: InstanceKey) -> dict[str, Any]: ...

    async def discard_evicted(self, key: InstanceKey) -> None: ...

    # --- operators ---

    async def evict_idle(self, *, idle_s: float) -> dict[str, list[dict[str, Any]]]:
        """``{"evicted": [...], "stayed": [{owner, name, reason}]}``: what went, and the idle instances that could
        not (their copy over the owner's snapshot quota, or the disk refusing it)."""
        ...

    async def storage(self) -> dict[str, Any]: ...

    async def devices(self) -> list[dict[str, Any]]: ...

    async def gauges(self) -> dict[str, Any]:
        """Instances by (kind, owner), state bytes by device, calls waiting by owner, the budget, storage, and
        compilations (count, seconds, persistent-cache hits, releases of every compiled program, programs since the
        last release)."""

    def describe_setup(self) -> dict[str, Any]:
        """What an operator wants in the start-up log line: devices, state directory, durability."""

    def busy(self) -> bool:
        """Whether work this backend started runs off the event loop now (a worker thread's call, a shard's):
        the front's busy polling (``api/polling.py``) stops then, not to take a core from it."""
