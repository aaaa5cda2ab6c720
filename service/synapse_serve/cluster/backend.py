"""``RayBackend``: the Backend interface over shard actors on a Ray cluster (docs/scaling.md).

The front (this process: the FastAPI server, any number of replicas) never imports JAX. It
starts or finds the shards — one named, detached actor per device, ``shard-<i>`` in the
deployment's namespace (``get_if_exists``), restarted by Ray when it dies (``max_restarts=-1``)
and never retried blindly by Ray (``max_task_retries=0``: our Idempotency-Key does that) — and
routes each instance to the shard that holds it. The durable name → shard map is the shards' own
state directories: at start-up the front asks every shard which names it holds, and a name it
does not know it looks up on every shard (another front may have created it).

A new instance goes to the shard holding the fewest state bytes (or the one ``device`` names:
``"shard-1"``, ``"shard-1/cpu:0"``, or an index into ``GET /v1/devices``); a shard whose budget
refuses it passes it to the next. A call whose shard dies is retried, once Ray has restarted it
and it has restored its instances, when repeating it cannot apply it twice: reads, writes, and
keyed calls (``evolve`` and ``step`` always carry a key; the key's answer is in the instance's
file in sync mode). Other calls answer 503 and leave the retry to the caller.

The calls a loop makes on every step (call, read, write) go to the shard over its direct channel
(``channel.py``), not Ray's actor call, unless ``ray_direct`` is off; a channel that cannot be
reached while Ray still reaches its shard is set aside for a while and Ray carries its calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from synapse_serve import errors
from synapse_serve.backend import ExportParts
from synapse_client._codec import WireError
from synapse_serve.cluster.channel import DIRECT_METHODS, Channel, ChannelLost, decode_answer, request_parts
from synapse_serve.cluster.shard import Directory, Shard, frame_cap
from synapse_serve.errors import (
    AlreadyExists,
    DeviceFull,
    InvalidRequest,
    NotFound,
    NotReady,
    QuotaExceeded,
    SynapseServeError,
    UnknownCompartment,
)
from synapse_serve.names import CompartmentRef, InstanceKey
from synapse_serve.settings import Settings

log = logging.getLogger("synapse_serve")
PING_TIMEOUT_S = 5.0
FIND_TIMEOUT_S = 10.0  # a shard that cannot list its names this fast is taken as not answering (a 503)
CHANNEL_SUSPEND_S = 30.0  # a channel Ray can see past but we cannot reach: how long Ray carries its calls
MAX_TRIES = 4  # a call whose shard fails under it: tries in all (each retry after the shard answers again)
# calls that may run again after their shard died mid-call without applying anything twice
RETRYABLE = frozenset({"describe", "help", "stats", "history", "list", "read", "write", "snapshots", "evicted",
                       "storage", "devices", "gauges", "probe", "export", "kinds", "kind_help", "describe_setup"})


def _raised(outcome: tuple, shard: int) -> Any:
    """A shard's answer, or its domain error raised again as the same class (a device it names, as the front's
    listings name it: ``shard-1/cpu:0``)."""
    if outcome[0] == "ok":
        return outcome[1]
    _, name, detail, extra, headers = outcome
    local = extra.get("device")
    if isinstance(local, str) and "/" not in local:
        extra = {**extra, "device": f"shard-{shard}/{local}"}
        detail = detail.replace(f"device {local} ", f"device shard-{shard}/{local} ")
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SynapseServeError)):
        cls = SynapseServeError
    error = cls.__new__(cls)
    SynapseServeError.__init__(error, detail, headers=headers, **extra)
    raise error


class RayBackend:
    """Instances on shard actors of a Ray cluster; every method as backend.Backend says."""

    def __init__(self, settings: Settings) -> None:
        import ray  # the optional extra: pip install 'synapse-serve[ray]'

        self.ray, self.settings = ray, settings
        if not ray.is_initialized():  # no address: a new local cluster ("local"), never a stale one Ray remembers
            ray.init(address=settings.ray_address or "local", include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=False)
        self._dead = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        # CPU clusters: two shards, or one where the cluster has CPUs for only one (Ray would never place the second)
        fits = int(resources.get("CPU", 0) // settings.ray_shard_cpus) if settings.ray_shard_cpus else 2
        count = settings.ray_shards or gpus or max(1, min(2, fits))
        options: dict[str, Any] = {
            "namespace": settings.ray_namespace, "lifetime": "detached", "get_if_exists": True,
            "max_restarts": -1, "max_task_retries": 0, "max_concurrency": settings.worker_threads}
        if gpus:
            options["num_gpus"] = 1
        else:  # Ray leaves CUDA_VISIBLE_DEVICES unset for 0-GPU actors: JAX must not look for one
            options.update(num_cpus=settings.ray_shard_cpus, num_gpus=0,
                           runtime_env={"env_vars": {"JAX_PLATFORMS": "cpu"}})
        shard_settings = settings.model_dump(mode="json")
        shard_settings.update(backend="local", tokens="", tokens_file=None, auth="off")
        actor = ray.remote(Shard)
        cores = settings.ray_shard_cpus
        pin = int(cores) if not gpus and settings.ray_pin_cpus and cores >= 1 and float(cores).is_integer() else 0
        self.shards = [actor.options(name=f"shard-{i}", **options).remote(i, shard_settings, pin) for i in range(count)]
        self._shard_settings = shard_settings
        self.channels = [Channel(self._locator(i), size=settings.worker_threads) if settings.ray_direct else None
                         for i in range(count)]
        self._frame_cap = frame_cap(settings)
        # the names every front of this deployment agrees on (creates claim them there first)
        self.directory = ray.remote(Directory).options(
            name="directory", namespace=settings.ray_namespace, lifetime="detached", get_if_exists=True,
            max_restarts=-1, max_task_retries=-1, num_cpus=0).remote(settings.ray_namespace, count)
        # the catalogue of kinds comes from a shard (the front has no JAX): the first one up answers
        self._kinds = self._blocking(0, "kinds")
        self._operations = frozenset(op for kind in self._kinds for op in kind["operations"])
        self._where: dict[InstanceKey, int] = {}
        self._in_flight = 0  # shard calls not answered yet (counted on the loop's thread)
        self.each_timeout_s = FIND_TIMEOUT_S  # how long a call asked of every shard waits for each
        self._creating: dict[InstanceKey, asyncio.Lock] = {}
        self._storage_error: str | None = None
        self._setup: dict[str, Any] = {}

    def _blocking(self, shard: int, method: str, *args: Any, **kwargs: Any) -> Any:
        return _raised(self.ray.get(self.shards[shard].run.remote(method, args, kwargs)), shard)

    def _locator(self, shard: int) -> Callable[[], Any]:
        async def locate() -> tuple[str, int, bytes]:
            where = await self.shards[shard].channel.remote()
            if where is None:
                raise ConnectionError("the shard has no channel (ray_direct is off where it started)")
            return where
        return locate

    async def _send(self, shard: int, method: str, args: tuple, kwargs: dict[str, Any]) -> tuple:
        """A shard's outcome of one method: over its direct channel when the method is a step's, else Ray's call."""
        self._in_flight += 1
        try:
            return await self._send_now(shard, method, args, kwargs)
        finally:
            self._in_flight -= 1

    async def _send_now(self, shard: int, method: str, args: tuple, kwargs: dict[str, Any]) -> tuple:
        channel = self.channels[shard]
        if channel is not None and method in DIRECT_METHODS and channel.usable():
            try:
                parts = request_parts(method, args, kwargs)
            except (WireError, TypeError, ValueError):  # a value the wire cannot carry (an integer past 64 bits):
                parts = None  # Ray carries it, and the shard's engine answers for it as a local server would
            if parts is not None and sum(len(part) for part in parts) <= self._frame_cap:
                outcome = await self._by_channel(shard, channel, method, parts)
                if outcome is not None:
                    return outcome
        return await self.shards[shard].run.remote(method, args, kwargs)

    async def _by_channel(self, shard: int, channel: Channel, method: str, parts: list) -> tuple | None:
        """The shard's outcome over its channel; None when Ray must carry the call instead (the shard refused the
        frame unrun, or its channel cannot be reached while Ray reaches the shard)."""
        for attempt in range(2):
            try:
                outcome = decode_answer(method, await channel.call(parts))
            except ChannelLost as exc:
                if exc.sent:
                    raise
                if attempt == 0:  # nothing was sent: a shard restarted meanwhile listens elsewhere, with a new secret
                    channel.forget()
                    continue
                # a shard Ray still reaches has a channel we cannot (a firewall, a port)
                if not await self._answers(shard):
                    raise
                log.warning("shard-%d answers Ray but not its direct channel (%s); Ray carries its calls for "
                            "%.0f s", shard, exc, CHANNEL_SUSPEND_S)
                channel.suspend(CHANNEL_SUSPEND_S)
                return None
            # a frame the shard could not decode within its limits: nothing ran, and Ray's call has no such limits
            return None if outcome[0] == "refused" else outcome
        return None

    async def _answers(self, shard: int) -> bool:
        try:
            await asyncio.wait_for(self._ping(shard), PING_TIMEOUT_S)
        except (TimeoutError, *self._dead):
            return False
        return True

    async def _run(self, shard: int, method: str, *args: Any, **kwargs: Any) -> Any:
        """One Backend method on one shard; after the shard died, retried once it is back if that is safe — a few
        times at most, within the restart timeout (a failure that repeats while the shard answers is no restart:
        retried without a bound, one request had kept a front and its shard busy for good)."""
        keyed = method in ("call", "call_many", "call_stacked") and kwargs.get("idempotency_key")
        # a write done before its shard died would answer its retry 412 (its If-Match has moved): not repeated
        retry = (method in RETRYABLE and not (method == "write" and kwargs.get("expected_version") is not None)
                 or keyed)
        deadline = time.monotonic() + self.settings.ray_restart_timeout_s
        for attempt in range(MAX_TRIES):
            try:
                return _raised(await self._send(shard, method, args, kwargs), shard)
            except (*self._dead, ChannelLost) as exc:
                if self.channels[shard] is not None:
                    self.channels[shard].forget()  # a restarted shard listens elsewhere
                unsent = isinstance(exc, ChannelLost) and not exc.sent  # nothing reached the shard: safe to repeat
                if not (retry or unsent):
                    raise NotReady(f"shard-{shard} stopped during the call ({type(exc).__name__}) and is being "
                                   "restarted; the call may or may not have been applied: read the instance, or retry "
                                   "it with an Idempotency-Key", headers={"Retry-After": "1"}) from None
                if attempt + 1 == MAX_TRIES or time.monotonic() > deadline:
                    break
                log.warning("shard-%d stopped during %s (%s); retrying once it is back", shard, method, exc)
                await self._wait_for(shard, deadline)
        raise NotReady(f"shard-{shard} failed {method} {MAX_TRIES} times (or for longer than "
                       f"{self.settings.ray_restart_timeout_s:.0f} s); it may or may not have been applied: read the "
                       "instance, or retry it with its Idempotency-Key", headers={"Retry-After": "5"})

    async def _wait_for(self, shard: int, deadline: float) -> None:
        while True:
            try:
                await asyncio.wait_for(self._ping(shard), PING_TIMEOUT_S)
                return
            except (TimeoutError, *self._dead):
                if time.monotonic() > deadline:
                    raise NotReady(f"shard-{shard} did not come back within {self.settings.ray_restart_timeout_s:.0f} s",
                                   headers={"Retry-After": "5"}) from None
                await asyncio.sleep(0.2)

    async def _ping(self, shard: int) -> int:
        return await self.shards[shard].ping.remote()

    async def _each(self, method: str, *args: Any, bounded: bool = True, **kwargs: Any) -> list[Any]:
        """A method's answer from every shard; NotReady (503) naming a shard that does not answer within
        ``each_timeout_s`` (stopped, or hung: a listing or a create's placement had waited for it with no bound)."""
        within = self.each_timeout_s if bounded else None

        async def one(index: int) -> Any:
            try:
                return await asyncio.wait_for(self._run(index, method, *args, **kwargs), within)
            except TimeoutError:
                raise NotReady(f"shard-{index} did not answer within {within:.0f} s (it is being restarted, or is "
                               "stuck); retry shortly", headers={"Retry-After": "5"}) from None

        return list(await asyncio.gather(*(one(i) for i in range(len(self.shards)))))

    # --- routing ---

    async def _find(self, key: InstanceKey) -> int | None:
        """The shard answering for ``key``, asking every shard (and remembering it), or None; NotReady (503) when
        a shard that does not answer (restarting, or hung) might hold it."""
        held = await asyncio.gather(*(asyncio.wait_for(shard.holds.remote(key.owner, key.name), FIND_TIMEOUT_S)
                                      for shard in self.shards), return_exceptions=True)
        silent = []
        for index, holds in enumerate(held):
            if isinstance(holds, BaseException):
                if not isinstance(holds, (TimeoutError, *self._dead)):
                    raise holds
                silent.append(index)
            elif holds is True:
                self._where[key] = index
                return index
        if silent:
            raise NotReady(f"shard-{silent[0]} does not answer (it is being restarted, or is stuck), and it may hold "
                           f"{key.name!r}; retry shortly", name=key.name, headers={"Retry-After": "1"})
        self._where.pop(key, None)
        return None

    async def _claim(self, key: InstanceKey) -> int | str | None:
        """Claim ``key``'s name in the directory (None: claimed; else who holds it, or the quota in the way). A name
        the directory gives a shard that no longer holds it (its own idle evictor took the instance out) is
        released and claimed again."""
        limits = (self.settings.max_instances_per_owner, self.settings.max_instances)
        holder = await self.directory.claim.remote(key.owner, key.name, *limits)
        if isinstance(holder, int) and holder >= 0 and await self._find(key) is None:
            await self.directory.release.remote(key.owner, key.name, holder)
            holder = await self.directory.claim.remote(key.owner, key.name, *limits)
        if holder == "max_instances":
            raise QuotaExceeded(f"quota max_instances: the server holds its maximum of {self.settings.max_instances} "
                                "instances", quota="max_instances")
        if holder == "max_instances_per_owner":
            raise QuotaExceeded(f"quota max_instances_per_owner: {key.owner!r} already holds "
                                f"{self.settings.max_instances_per_owner} of {self.settings.max_instances_per_owner} "
                                "instances", quota="max_instances_per_owner")
        return holder

    async def _shard_of(self, key: InstanceKey) -> int:
        shard = self._where.get(key)
        if shard is None:
            shard = await self._find(key)
        if shard is None:
            raise NotFound(f"no instance named {key.name!r}", name=key.name)
        return shard

    async def _on(self, key: InstanceKey, method: str, *args: Any, **kwargs: Any) -> Any:
        """A method on the shard of ``key`` (see ``_on_shard``)."""
        return (await self._on_shard(key, method, *args, **kwargs))[1]

    async def _on_shard(self, key: InstanceKey, method: str, *args: Any, **kwargs: Any) -> tuple[int, Any]:
        """The shard of ``key`` and a method's answer there; a name that moved (deleted and created again through
        another front) is looked up again once."""
        shard = await self._shard_of(key)
        try:
            return shard, await self._run(shard, method, key, *args, **kwargs)
        except NotFound:
            moved = await self._find(key)
            if moved is None or moved == shard:
                raise
            return moved, await self._run(moved, method, key, *args, **kwargs)

    def _named(self, shard: int, description: dict[str, Any]) -> dict[str, Any]:
        """A shard's description with its device named across the cluster (``shard-1/cpu:0``)."""
        return {**description, "device": f"shard-{shard}/{description['device']}", "shard": shard}

    # --- lifecycle ---

    async def start(self) -> None:
        """Nothing to take: each shard holds its own directory's lock (started in the constructor)."""

    async def get_ready(self, phase: Callable[[str], None]) -> None:
        phase("starting shards")
        for index in range(len(self.shards)):
            await self._wait_for(index, time.monotonic() + self.settings.ray_restart_timeout_s)
        for index, started in enumerate(await asyncio.gather(*(s.started_with.remote() for s in self.shards))):
            differ = sorted(k for k in self._shard_settings.keys() | started.keys()
                            if self._shard_settings.get(k) != started.get(k))
            if differ:  # a detached shard found running keeps what it was started with: say so, loudly
                log.warning("shard-%d runs with the settings it was started with, not this front's (%s differ): "
                            "limits and durability there are the old ones until the shards are stopped (ray stop, "
                            "or kill the shard-<i> actors) and started again", index, ", ".join(differ[:12]))
        phase("mapping instances to shards")
        held = await asyncio.gather(*(shard.keys.remote() for shard in self.shards))
        for index, keys in enumerate(held):
            for owner, name in keys:
                self._where[InstanceKey(owner, name)] = index
        await self.directory.learn.remote([(owner, name, i) for i, keys in enumerate(held) for owner, name in keys])
        for index, usage in enumerate(await asyncio.gather(*(shard.usage.remote() for shard in self.shards))):
            for kind in ("state", "snapshot"):  # the byte ledger too (a directory that missed a slow shard)
                for owner, nbytes in usage[kind].items():
                    await self.directory.report.remote(index, owner, kind, nbytes, tuple(usage["seq"]))
        setups = await self._each("describe_setup", bounded=False)  # a shard restoring many instances takes its time
        self._setup = {"devices": [f"shard-{i}/{d}" for i, s in enumerate(setups) for d in s["devices"]],
                       "state_dir": str(self.settings.state_dir.resolve()),
                       "durability": setups[0]["durability"] if setups else self.settings.durability}

    async def probe(self) -> dict[str, Any]:
        answers = await asyncio.gather(*(asyncio.wait_for(self._ping(i), PING_TIMEOUT_S)
                                         for i in range(len(self.shards))), return_exceptions=True)
        up = sum(not isinstance(a, BaseException) for a in answers)
        if up < len(self.shards):
            raise NotReady(f"{up} of {len(self.shards)} shards up")
        await asyncio.wait_for(self._each("probe"), PING_TIMEOUT_S)  # every device of every shard computes
        return {"shards": f"{up}/{len(self.shards)} up"}

    async def close(self) -> None:
        """The shards are detached and shared by every front: they stay (an operator stops them with the cluster);
        this front's connections to their channels close."""
        for channel in self.channels:
            if channel is not None:
                channel.forget()

    def storage_error(self) -> str | None:
        return self._storage_error

    # --- kinds ---

    def kinds(self) -> list[dict[str, Any]]:
        return self._kinds

    def kind_help(self, kind: str) -> dict[str, Any]:
        for entry in self._kinds:
            if entry["name"] == kind:
                return entry["help"]
        # the catalogue is here: no shard is asked (a blocking call on the loop, and none answers while restarting)
        raise NotFound(f"unknown kind {kind!r}; known kinds: {', '.join(e['name'] for e in self._kinds)}",
                       kind=str(kind))

    def operation_names(self) -> frozenset[str]:
        return self._operations

    # --- instances ---

    async def create(self, key: InstanceKey, *, kind: str, config: Mapping[str, Any],
                     init: Mapping[str, Any] | None = None, seed: int = 0, durability: str | None = None,
                     device: str | int | None = None) -> dict[str, Any]:
        async with self._name_lock(key):  # one create of a name at a time through this front
            order, device = await self._placement(device)
            return await self._place(key, order, "create", kind=kind, config=config, init=init, seed=seed,
                                     durability=durability, device=device)

    def _name_lock(self, key: InstanceKey) -> asyncio.Lock:
        if len(self._creating) > 4096:  # forget the locks nobody holds
            self._creating = {k: lock for k, lock in self._creating.items() if lock.locked()}
        return self._creating.setdefault(key, asyncio.Lock())

    async def _place(self, key: InstanceKey, order: list[int], method: str, **kwargs: Any) -> dict[str, Any]:
        """Create (or import) ``key`` on the first shard of ``order`` with room; its description. The name is
        claimed in the deployment's directory first, so no other front can take it meanwhile."""
        holder = await self._claim(key)
        if holder is not None:
            raise AlreadyExists(f"an instance named {key.name!r} already exists" if holder != -1 else
                                f"an instance named {key.name!r} is being created", name=key.name)
        settled = False
        try:  # from here the claim is ours: released whatever fails (a shard that does not answer: 503)
            found = await self._find(key)
            if found is not None:  # a shard holds it but the directory had not heard (it restarted): tell it
                await self.directory.settle.remote(key.owner, key.name, found)
                settled = True
                raise AlreadyExists(f"an instance named {key.name!r} already exists", name=key.name)
            refused: DeviceFull | None = None
            for shard in order:
                try:
                    description = await self._run(shard, method, key, **kwargs)
                except DeviceFull as exc:  # this shard's budget: the next one may have room
                    refused = exc
                    continue
                self._where[key] = shard
                await self.directory.settle.remote(key.owner, key.name, shard)
                settled = True
                return self._named(shard, description)
            raise refused or DeviceFull("no shard has room for it")
        finally:
            if not settled:
                await self.directory.release.remote(key.owner, key.name)

    async def _placement(self, device: str | int | None) -> tuple[list[int], str | int | None]:
        """The shards to try, best first, and the device to ask of them."""
        if isinstance(device, str) and device.startswith("shard-"):
            name, _, local = device.partition("/")
            number = name.removeprefix("shard-")
            shard = int(number) if number.isascii() and number.isdigit() else -1  # int() reads any script's digits
            if not 0 <= shard < len(self.shards):
                raise InvalidRequest(f"device: no shard {name[:40]!r}; this cluster has shard-0 to "
                                     f"shard-{len(self.shards) - 1}", argument="device")
            return [shard], (local or None)
        devices = await self._each("devices")
        if isinstance(device, int) and not isinstance(device, bool):
            flat = [(shard, index) for shard, listed in enumerate(devices) for index in range(len(listed))]
            if not 0 <= device < len(flat):
                raise InvalidRequest(f"device: index {device} is not one of 0..{len(flat) - 1}", argument="device")
            return [flat[device][0]], flat[device][1]
        held = [sum(d["state_bytes"] for d in listed) for listed in devices]
        return sorted(range(len(self.shards)), key=lambda s: (held[s], s)), device

    async def describe(self, key: InstanceKey) -> dict[str, Any]:
        return self._named(*await self._on_shard(key, "describe"))

    async def help(self, key: InstanceKey) -> dict[str, Any]:
        return await self._on(key, "help")

    async def stats(self, key: InstanceKey) -> dict[str, Any]:
        return await self._on(key, "stats")

    async def history(self, key: InstanceKey) -> dict[str, Any]:
        return await self._on(key, "history")

    async def list(self, *, owner: str | None) -> list[dict[str, Any]]:
        listed = await self._each("list", owner=owner)
        out = [self._named(shard, d) for shard, descriptions in enumerate(listed) for d in descriptions]
        return sorted(out, key=lambda d: (d["owner"], d["name"]))

    async def delete(self, key: InstanceKey, *, expected_version: int | None = None) -> None:
        shard, _ = await self._on_shard(key, "delete", expected_version=expected_version)
        self._where.pop(key, None)
        await self.directory.release.remote(key.owner, key.name, shard)

    async def call(self, key: InstanceKey, *, operation: str, tensors: Mapping[str, Any],
                   returns: list[str] | None = None, idempotency_key: str | None = None,
                   expected_version: int | None = None, sequence: Mapping[str, Any] | None = None
                   ) -> dict[str, Any]:
        shard = await self._shard_of(key)
        tensors, stands_for = await self._fetch_references(key, shard, tensors)
        extra = {"stands_for": stands_for} if stands_for else {}
        return await self._on(key, "call", operation=operation, tensors=tensors, returns=returns,
                              idempotency_key=idempotency_key, expected_version=expected_version, sequence=sequence,
                              **extra)

    async def _fetch_references(self, key: InstanceKey, shard: int, tensors: Mapping[str, Any]
                                ) -> tuple[dict[str, Any], dict[str, list[str]]]:
        """References to another owner's-own instance on another shard become its values, read before the call
        (the local engine reads them before taking the caller's lock too), and what each stood for: a keyed
        call's retry is the same request when the referenced values have changed since, as on one host."""
        out, stands_for = dict(tensors), {}
        for argument, value in tensors.items():
            if isinstance(value, CompartmentRef) and value.instance is not None:
                other = InstanceKey(key.owner, value.instance)
                other_shard = await self._shard_of(other)
                if other_shard != shard:
                    out[argument] = await self._referred(other, argument, value.compartment)
                    stands_for[argument] = [value.compartment, value.instance]
        return out, stands_for

    async def _referred(self, other: InstanceKey, argument: str, compartment: str) -> Any:
        """A floating compartment of ``other`` a reference names, refused in one host's words when there is none."""
        try:
            values, _ = await self._on(other, "read", compartment=compartment)
        except UnknownCompartment:
            values = None
        if values is not None and str(values.dtype).startswith(("float", "bfloat")):
            return values
        described = await self._on(other, "describe")
        floating = sorted(name for name, spec in described["compartments"].items()
                          if spec["dtype"].startswith(("float", "bfloat")))
        raise UnknownCompartment(f"{argument}: cannot refer to {str(compartment)[:128]!r}: no such floating "
                                 f"compartment in {other.name!r}; it has: {', '.join(floating)}", argument=argument)

    async def call_many(self, keys: list[InstanceKey], *, operation: str, tensors: list[Mapping[str, Any]],
                        returns: list[str] | None = None, idempotency_key: str | None = None
                        ) -> list[dict[str, Any]]:
        shard = await self._packed_shard(keys)
        return await self._run(shard, "call_many", keys, operation=operation, tensors=tensors, returns=returns,
                               idempotency_key=idempotency_key)

    async def call_stacked(self, keys: list[InstanceKey], *, operation: str, tensors: Mapping[str, Any],
                           returns: list[str] | None = None, idempotency_key: str | None = None) -> dict[str, Any]:
        shard = await self._packed_shard(keys, "names")
        return await self._run(shard, "call_stacked", keys, operation=operation, tensors=tensors, returns=returns,
                               idempotency_key=idempotency_key)

    async def _packed_shard(self, keys: list[InstanceKey], field: str = "calls") -> int:
        """The one shard a packed call's instances live on (InvalidRequest if they are spread over several); a
        missing one is named as the local engine names it (``calls[1] ('zz'): …``, ``call: 1``)."""
        found = set()
        for index, key in enumerate(keys):
            try:
                found.add(await self._shard_of(key))
            except NotFound as exc:
                exc.detail = f"{field}[{index}] ({key.name!r}): {exc.detail}"
                exc.args = (exc.detail,)
                exc.extra.setdefault("call", index)
                raise
        shards = sorted(found) if keys else [0]
        if len(shards) > 1:
            raise InvalidRequest(f"calls: a packed call is applied all or nothing on one shard, and these instances "
                                 f"live on shards {', '.join(map(str, shards))}; pack the instances of each shard "
                                 "apart", argument="calls")
        return shards[0]

    async def read(self, key: InstanceKey, *, compartment: str) -> Any:
        return await self._on(key, "read", compartment=compartment)

    async def write(self, key: InstanceKey, *, compartment: str, value: Any,
                    expected_version: int | None = None) -> int:
        return await self._on(key, "write", compartment=compartment, value=value, expected_version=expected_version)

    # --- files ---

    async def export(self, key: InstanceKey) -> ExportParts:
        blob = await self._on(key, "export")
        return len(blob), lambda: iter([blob])

    async def import_(self, key: InstanceKey, *, blob: bytes) -> dict[str, Any]:
        async with self._name_lock(key):
            order, _ = await self._placement(None)
            return await self._place(key, order, "import_", blob=blob)

    async def snapshot(self, key: InstanceKey, *, snapshot: str) -> dict[str, Any]:
        return await self._on(key, "snapshot", snapshot=snapshot)

    async def snapshots(self, key: InstanceKey) -> list[dict[str, Any]]:
        return await self._on(key, "snapshots")

    async def rollback(self, key: InstanceKey, *, snapshot: str, expected_version: int | None = None) -> int:
        return await self._on(key, "rollback", snapshot=snapshot, expected_version=expected_version)

    async def delete_snapshot(self, key: InstanceKey, *, snapshot: str) -> None:
        await self._on(key, "delete_snapshot", snapshot=snapshot)

    async def _evicted_copies(self, owner: str) -> dict[str, list[tuple[float, int, dict[str, Any]]]]:
        """Each evicted name of ``owner``, its copies newest first: ``(evicted_at, shard, entry)``. Each shard keeps
        one a name, and a name evicted, created again elsewhere and evicted again has one on each shard."""
        copies: dict[str, list[tuple[float, int, dict[str, Any]]]] = {}
        for shard, entries in enumerate(await self._each("evicted", owner=owner)):
            for entry in entries:
                copies.setdefault(entry["name"], []).append((entry.get("evicted_at") or 0.0, shard, entry))
        for found in copies.values():
            found.sort(key=lambda copy: (-copy[0], copy[1]))
        return copies

    async def evicted(self, *, owner: str) -> list[dict[str, Any]]:
        """The latest copy of each name, as one server lists them (an older one on another shard is not restored)."""
        latest = [found[0] for found in (await self._evicted_copies(owner)).values()]
        return [{**entry, "shard": shard} for _, shard, entry in sorted(latest, key=lambda copy: copy[0])]

    async def unevict(self, key: InstanceKey) -> dict[str, Any]:
        """The latest copy comes back (a red-team run found the older of two brought back, the newer left evicted
        and counted); the older ones on other shards go once it is back."""
        found = (await self._evicted_copies(key.owner)).get(key.name)
        if not found:
            raise NotFound(f"no evicted instance named {key.name!r}", name=key.name)
        shard = found[0][1]
        if await self._claim(key) is not None:
            raise AlreadyExists(f"an instance named {key.name!r} already exists", name=key.name)
        try:
            description = await self._run(shard, "unevict", key)
        except BaseException:
            await self.directory.release.remote(key.owner, key.name)
            raise
        self._where[key] = shard
        await self.directory.settle.remote(key.owner, key.name, shard)
        await self._discard_older(key, [other for _, other, _ in found[1:]])
        return self._named(shard, description)

    async def _discard_older(self, key: InstanceKey, shards: list[int]) -> None:
        for shard in shards:
            try:
                await self._run(shard, "discard_evicted", key)
            except NotFound:  # discarded there meanwhile
                pass
            except SynapseServeError as exc:  # it stays listed on no one's behalf: only its quota is held
                log.warning("an older evicted copy of %s on shard-%d was not discarded: %s", key, shard, exc.detail)

    async def discard_evicted(self, key: InstanceKey) -> None:
        listed = await self._each("evicted", owner=key.owner)
        holding = [shard for shard, entries in enumerate(listed) if any(e.get("name") == key.name for e in entries)]
        if not holding:
            raise NotFound(f"no evicted instance named {key.name!r}", name=key.name)
        for shard in holding:  # a name evicted on two shards (moved between them) has a copy on each
            with contextlib.suppress(NotFound):  # (discarded there meanwhile)
                await self._run(shard, "discard_evicted", key)

    # --- operators ---

    async def evict_idle(self, *, idle_s: float) -> dict[str, list[dict[str, Any]]]:
        swept = await self._each("evict_idle", idle_s=idle_s)
        evicted = [answer["evicted"] for answer in swept]
        written: dict[InstanceKey, int] = {}
        for shard, entries in enumerate(evicted):
            for entry in entries:
                key = InstanceKey(entry["owner"], entry["name"])
                self._where.pop(key, None)
                await self.directory.release.remote(entry["owner"], entry["name"], shard)
                written[key] = shard
        # the copy just written is the name's latest: one left on another shard is the older. Each owner's copies
        # are listed once (not asked of every other shard name by name: a sweep evicts many names at once).
        for owner in {key.owner for key in written}:
            try:
                listed = await self._each("evicted", owner=owner)
            except SynapseServeError as exc:  # a shard not answering: its older copies stay listed, holding quota
                log.warning("older evicted copies of %s's instances were not looked for: %s", owner, exc.detail)
                continue
            for shard, entries in enumerate(listed):
                for entry in entries:
                    key = InstanceKey(owner, entry["name"])
                    if written.get(key, shard) != shard:
                        await self._discard_older(key, [shard])
        return {"evicted": [entry for entries in evicted for entry in entries],
                "stayed": [entry for answer in swept for entry in answer["stayed"]]}

    async def storage(self) -> dict[str, Any]:
        statuses = await self._each("storage")
        failing = [s["storage_error"] for s in statuses if s.get("storage_error")]
        self._storage_error = failing[0] if failing else None
        return {"durability": statuses[0]["durability"], "storage_error": self._storage_error,
                "restore_errors": {k: v for s in statuses for k, v in s.get("restore_errors", {}).items()},
                "shards": [{"shard": i, **s} for i, s in enumerate(statuses)]}

    async def devices(self) -> list[dict[str, Any]]:
        listed = await self._each("devices")
        return [{**d, "device": f"shard-{shard}/{d['device']}", "shard": shard}
                for shard, devices in enumerate(listed) for d in devices]

    async def gauges(self) -> dict[str, Any]:
        answers = await asyncio.gather(*(asyncio.wait_for(self._run(i, "gauges"), PING_TIMEOUT_S)
                                         for i in range(len(self.shards))), return_exceptions=True)
        compiles = {"count": 0, "seconds": 0.0, "cache_hits": 0, "releases": 0, "since_release": 0,  # shards' sums
                    "memory_maps": 0, "memory_trims": 0}
        merged: dict[str, Any] = {"instances": {}, "state_bytes": {}, "queue_depth": {}, "memory": {},
                                  "device_budget_bytes": self.settings.device_budget_bytes,
                                  "storage_failing": False, "compiles": compiles, "shards": {}}
        for shard, gauges in enumerate(answers):
            merged["shards"][f"shard-{shard}"] = not isinstance(gauges, BaseException)
            if isinstance(gauges, BaseException):
                continue
            for key, count in gauges["instances"].items():
                merged["instances"][key] = merged["instances"].get(key, 0) + count
            for device, held in gauges["state_bytes"].items():
                merged["state_bytes"][f"shard-{shard}/{device}"] = held
            for owner, depth in gauges["queue_depth"].items():
                merged["queue_depth"][owner] = merged["queue_depth"].get(owner, 0) + depth
            for device, memory in gauges.get("memory", {}).items():
                merged["memory"][f"shard-{shard}/{device}"] = memory
            merged["storage_failing"] |= bool(gauges["storage_failing"])
            for field in compiles:
                compiles[field] += gauges["compiles"][field]
        return merged

    def busy(self) -> bool:
        return self._in_flight > 0

    def describe_setup(self) -> dict[str, Any]:
        return self._setup or {"devices": [], "state_dir": str(self.settings.state_dir), "durability":
                               self.settings.durability}

    def shard_info(self) -> list[dict[str, Any]]:
        """Each shard's index, process id, host and phase (blocking: for tests and operators)."""
        return self.ray.get([shard.info.remote() for shard in self.shards])


