"""Capacity: the devices, where a new instance goes, and every limit on what instances may hold.

Everything that can allocate is checked here before the work runs: a new instance (create,
import, bringing back an evicted one), a call whose result would hold more state than now (a
larger batch), a snapshot on disk. What is counted is real: an instance's current state bytes
(``Instance.held_bytes``), kept current by every commit, and each owner's snapshot files.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol

import jax
import numpy as np

from synapse_serve.errors import DeviceFull, InvalidConfig, InvalidRequest, QuotaExceeded, ShapeMismatch
from synapse_serve.local.instance import device_name


@dataclass(frozen=True)
class Limits:
    """The quotas and budgets an operator sets (None: no limit)."""

    max_instances: int = 10_000
    max_instances_per_owner: int | None = None
    max_state_bytes_per_owner: int | None = None
    max_snapshot_bytes_per_owner: int | None = None
    max_batch: int | None = None
    device_budget_bytes: int | None = None
    max_answer_bytes: int | None = None


class Ledger(Protocol):
    """Where a shard's owner bytes are counted with every other shard's (``cluster/shard.py``)."""

    def report(self, owner: str, kind: str, held: int) -> None:
        """What ``owner`` holds on this shard now (``kind``: "state" or "snapshot")."""

    def claim(self, owner: str, kind: str, held: int, more: int, quota: int) -> tuple[int, bool]:
        """What ``owner`` holds across the shards (``held`` here), and whether ``more`` fits ``quota``; if it does,
        this shard's count is ``held + more`` from now on."""


class Capacity:
    """Devices, placement and the accounting behind every quota and budget. Thread-safe."""

    def __init__(self, limits: Limits, devices: list[jax.Device] | None = None) -> None:
        self.limits = limits
        self.devices = list(devices or jax.devices())
        self._lock = threading.Lock()
        self._device_bytes: dict[jax.Device, int] = {d: 0 for d in self.devices}
        self._owner_bytes: Counter[str] = Counter()
        self._owner_count: Counter[str] = Counter()
        self._snapshot_bytes: Counter[str] = Counter()
        self._count = 0
        # a shard of a Ray deployment: the owner byte quotas are counted across every shard (cluster/shard.py)
        self.ledger: Ledger | None = None

    # --- devices ---

    def device_names(self) -> list[str]:
        """The devices instances can be placed on, as ``platform:id`` (``"cpu:0"``, ``"cuda:1"``)."""
        return [device_name(d) for d in self.devices]

    def resolve(self, requested: str | int | None, nbytes: int) -> jax.Device:
        """The device for a new instance: the one asked for (a name or an index), else the least filled."""
        if requested is None:
            with self._lock:
                return min(self.devices, key=lambda d: self._device_bytes[d])
        names = self.device_names()
        if isinstance(requested, int) and not isinstance(requested, bool) and 0 <= requested < len(names):
            return self.devices[requested]
        if isinstance(requested, str) and requested in names:
            return self.devices[names.index(requested)]
        raise InvalidConfig(f"device: {str(requested)[:80]!r} is not one of this server's devices: "
                            f"{', '.join(names)} (or their index 0..{len(names) - 1})", field="device")

    def device_bytes(self, device: jax.Device) -> int:
        with self._lock:
            return self._device_bytes[device]

    def devices_info(self) -> list[dict[str, Any]]:
        """Per device: kind, state bytes held, the budget, and (GPUs) JAX's memory in use and limit."""
        out = []
        with self._lock:
            held = dict(self._device_bytes)
        for device in self.devices:
            memory = device.memory_stats() or {}
            out.append({"device": device_name(device), "kind": getattr(device, "device_kind", device.platform),
                        "state_bytes": held[device], "budget_bytes": self.limits.device_budget_bytes,
                        "memory_bytes_in_use": memory.get("bytes_in_use"),
                        "memory_bytes_limit": memory.get("bytes_limit")})
        return out

    def probe(self) -> None:
        """A tiny computation on every device, waited for: raises if one cannot compute."""
        for device in self.devices:
            jax.block_until_ready(jax.device_put(np.ones(1, np.float32), device) + 1)

    # --- instances ---

    def admit(self, owner: str, device: jax.Device, nbytes: int, *, check: bool = True) -> None:
        """Count a new instance of ``nbytes`` on ``device`` for ``owner``; with ``check``, refuse it first if
        any quota or the device's budget would be exceeded (a stored instance coming back is not checked:
        it was admitted before, and lowered limits must not drop it)."""
        with self._lock:
            if check:
                limits = self.limits
                if self._count >= limits.max_instances:
                    raise QuotaExceeded(f"quota max_instances: the server holds its maximum of "
                                        f"{limits.max_instances} instances", quota="max_instances")
                owned = self._owner_count[owner]
                if limits.max_instances_per_owner is not None and owned >= limits.max_instances_per_owner:
                    raise QuotaExceeded(f"quota max_instances_per_owner: {owner!r} already holds {owned} of "
                                        f"{limits.max_instances_per_owner} instances",
                                        quota="max_instances_per_owner")
                self._check_bytes(owner, device, nbytes)
            self._count += 1
            self._owner_count[owner] += 1
            self._owner_bytes[owner] += nbytes
            self._device_bytes[device] += nbytes
            self._report(owner, "state")

    def release(self, owner: str, device: jax.Device, nbytes: int) -> None:
        """Forget an instance that held ``nbytes`` (deleted, evicted, or a create that failed)."""
        with self._lock:
            self._count -= 1
            self._owner_count[owner] -= 1
            self._owner_bytes[owner] -= nbytes
            self._device_bytes[device] -= nbytes
            self._report(owner, "state")

    def resize(self, owner: str, device: jax.Device, old: int, new: int, *, check: bool = True) -> None:
        """An instance's state goes from ``old`` to ``new`` bytes; with ``check``, growth that would go over a
        quota or the budget is refused before anything changes."""
        if new == old:
            return
        with self._lock:
            if check and new > old:
                self._check_bytes(owner, device, new - old)
            self._owner_bytes[owner] += new - old
            self._device_bytes[device] += new - old
            self._report(owner, "state")

    def _report(self, owner: str, kind: str) -> None:
        """Tell the ledger (a shard's) what the owner holds here now (under the lock: in the order of the changes)."""
        if self.ledger is not None:
            self.ledger.report(owner, kind, (self._owner_bytes if kind == "state" else self._snapshot_bytes)[owner])

    def _used(self, owner: str, kind: str, more: int, quota: int) -> tuple[int, bool]:
        """What the owner holds (here, or across a deployment's shards) and whether ``more`` fits the quota; where a
        ledger counts across shards, a fit is reserved there at once (two shards cannot both take the last room)."""
        used = (self._owner_bytes if kind == "state" else self._snapshot_bytes)[owner]
        if self.ledger is not None:
            return self.ledger.claim(owner, kind, used, more, quota)
        return used, used + more <= quota

    def _check_bytes(self, owner: str, device: jax.Device, more: int) -> None:
        limits = self.limits
        budget, held = limits.device_budget_bytes, self._device_bytes[device]
        fits_device = budget is None or held + more <= budget
        if limits.max_state_bytes_per_owner is not None:
            used, fits = self._used(owner, "state", more, limits.max_state_bytes_per_owner)
            if fits and not fits_device:
                self._report(owner, "state")  # the ledger's reservation falls with the refusal
            if not fits:
                raise QuotaExceeded(
                    f"quota max_state_bytes_per_owner: {owner!r} holds {used} bytes of state; this needs {more} more, "
                    f"over the quota of {limits.max_state_bytes_per_owner}", quota="max_state_bytes_per_owner",
                    used_bytes=used, needed_bytes=more)
        if not fits_device:
            raise DeviceFull(
                f"device {device_name(device)} holds {held} bytes of state; this needs {more} more, over the "
                f"device budget of {budget} bytes"
                + ("" if len(self.devices) == 1 else "; another device may have room (see GET /v1/devices)"),
                device=device_name(device), used_bytes=held, needed_bytes=more, budget_bytes=budget)

    def check_batch(self, argument: str, batch: int, steps: int = 0) -> None:
        """ShapeMismatch if ``batch`` (times ``steps``, in a sequence) is over the server's max_batch."""
        if self.limits.max_batch is None:
            return
        if batch > self.limits.max_batch:
            raise ShapeMismatch(f"{argument}: batch {batch} is over the server's max_batch of "
                                f"{self.limits.max_batch}", argument=argument)
        if steps * batch > self.limits.max_batch:
            raise ShapeMismatch(f"{argument}: {steps} steps of batch {batch} is {steps * batch} samples, over the "
                                f"server's max_batch of {self.limits.max_batch} for a sequence; send fewer steps per "
                                "call", argument=argument)

    def check_answer(self, owner: str, nbytes: int, how: str, remedy: str = "use sequence every=k or last") -> None:
        """InvalidRequest if an answer of ``nbytes`` (``how``: where they come from) would be over max_answer_bytes or
        over the owner's state quota: an answer is held in the server's memory as state is, and a sequence's
        answer grows with its steps while its request need not."""
        limits = self.limits
        for name, limit in (("max_answer_bytes", limits.max_answer_bytes),
                            ("max_state_bytes_per_owner", limits.max_state_bytes_per_owner)):
            if limit is not None and nbytes > limit:
                raise InvalidRequest(f"the answer would hold {nbytes} bytes ({how}), over the server's {name} of "
                                     f"{limit}; return fewer compartments, or {remedy}",
                                     argument="sequence", limit=name, answer_bytes=nbytes)

    # --- snapshots on disk ---

    def set_snapshot_bytes(self, used: dict[str, int]) -> None:
        """What each owner's snapshot files hold (from a walk of the state directory at start-up)."""
        with self._lock:
            self._snapshot_bytes = Counter(used)
            for owner in used:
                self._report(owner, "snapshot")

    def admit_snapshot(self, owner: str, nbytes: int) -> None:
        """Count a new snapshot file; refused first if the owner's snapshot quota would be exceeded."""
        with self._lock:
            quota = self.limits.max_snapshot_bytes_per_owner
            if quota is not None:
                used, fits = self._used(owner, "snapshot", nbytes, quota)
                if not fits:
                    raise QuotaExceeded(
                        f"quota max_snapshot_bytes_per_owner: {owner!r} keeps {used} bytes of snapshots and evicted "
                        f"copies; this one needs {nbytes} more, over the quota of {quota}: delete snapshots you no "
                        "longer need",
                        quota="max_snapshot_bytes_per_owner", used_bytes=used, needed_bytes=nbytes)
            self._snapshot_bytes[owner] += nbytes
            self._report(owner, "snapshot")

    def release_snapshot(self, owner: str, nbytes: int) -> None:
        """Forget ``nbytes`` of the owner's files on disk (a deleted snapshot or evicted copy)."""
        with self._lock:
            self._snapshot_bytes[owner] -= nbytes
            self._report(owner, "snapshot")

    def usage(self) -> dict[str, dict[str, int]]:
        """Every owner's state and snapshot bytes here (what a shard tells a ledger that starts afresh). Not under the
        lock: a growth holds it while it waits on that ledger (each copy is one step under the GIL)."""
        return {"state": dict(self._owner_bytes), "snapshot": dict(self._snapshot_bytes)}

    # --- gauges ---

    def owner_usage(self, owner: str) -> dict[str, int]:
        with self._lock:
            return {"instances": self._owner_count[owner], "state_bytes": self._owner_bytes[owner],
                    "snapshot_bytes": self._snapshot_bytes[owner]}

    def state_bytes_by_device(self) -> dict[str, int]:
        with self._lock:
            return {device_name(d): n for d, n in self._device_bytes.items()}

    @property
    def count(self) -> int:
        return self._count
