"""The local backend: the Backend interface over this process's registry, and the choice of where each call runs.

Registry work is blocking (JAX computes, locks wait, files are written), so it runs on a pool
of worker threads, never on the event loop — except a call measured quick: one whose last run
on that instance, with the same argument shapes and the same compartment shapes, took less
than the inline bound, on an instance no other call holds and whose writes are not
synchronous. Those run on the loop itself, which saves the thread hop. The bound is
``inline_call_us``, or ``inline_hop_factor`` times the hop this process measures (at most
``INLINE_CEILING_S``) when that is more: a hop costs ~30-90 µs on an idle multi-core host but
~200 µs on a 2-vCPU VM (two cross-CPU wake-ups), where handing a 0.3 ms call to a worker made it
half as long again; and the loop is never blocked longer than the ceiling by one call.

With ``in_caller_thread`` (the blocking client's in-process mode, which steps these coroutines
itself, without an event loop) every method runs its work in the caller's thread: there is no
loop to keep free, and no hop to pay.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
import gc
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import numpy as np

from synapse_serve.backend import ExportParts
from synapse_serve.kinds import KINDS, get_kind
from synapse_serve.local.capacity import Capacity, Limits
from synapse_serve.local.persistence import Persistence
from synapse_serve.local.registry import Busy, Registry
from synapse_serve.names import CompartmentRef, InstanceKey
from synapse_serve.settings import Settings
from synapse_serve.shares import Slots
from synapse_serve.store import Store

log = logging.getLogger("synapse_serve")
COSTS_KEPT = 8192
HOPS_KEPT = 31  # recent hand-offs to a worker, whose median sets the inline bound
INLINE_CEILING_S = 0.002  # a measured hop never lets one call hold the event loop longer than this
PROBE_TIMEOUT_S = 5.0


def _referred(owner: str, tensors: Any) -> list[InstanceKey]:
    """The other instances a call's references read (``{"ref", "instance"}``): the call waits for them too."""
    if not isinstance(tensors, Mapping):
        return []
    return [InstanceKey(owner, value.instance) for value in tensors.values()
            if isinstance(value, CompartmentRef) and isinstance(value.instance, str)]


def enable_compilation_cache(directory: Path) -> None:
    """JAX's persistent compilation cache in ``directory``, for every program however fast it compiled.

    Process-wide (a JAX setting): a restarted server loads its executables instead of compiling. Its size on disk is
    bounded by a ``CachePruner``, not by JAX's own bound, whose every write reads every entry of the directory
    (~20-40 µs an entry: seconds a compile for a cache of a gigabyte of small programs).
    """
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def apply_memory_settings(settings: Settings) -> None:
    """GPU memory behaviour for JAX, unless the environment already says (call before JAX starts a backend)."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "true" if settings.gpu_preallocate else "false")
    if settings.gpu_memory_fraction is not None:
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(settings.gpu_memory_fraction))


def apply_dispatch_setting(settings: Settings) -> None:
    """JAX's asynchronous CPU dispatch as the settings say, if JAX has not started its CPU backend yet (it reads
    the flag then, once per process); otherwise the process keeps what it has, and a log line says so."""
    wanted = settings.cpu_async_dispatch
    if jax.config.values["jax_cpu_enable_async_dispatch"] == wanted:
        return
    bridge = getattr(getattr(jax, "_src", None), "xla_bridge", None)  # JAX has no public "started?"
    if not hasattr(bridge, "backends_are_initialized") or bridge.backends_are_initialized():
        log.info("JAX's CPU backend was started before the engine: its asynchronous dispatch stays %s "
                 "(SYNAPSE_CPU_ASYNC_DISPATCH applies only before)", "on" if not wanted else "off")
        return
    jax.config.update("jax_cpu_enable_async_dispatch", wanted)


def freeze_start_up_objects() -> None:
    """Keep what start-up left alive out of the cyclic collector's full collections (``gc.freeze``).

    JAX, the modules and the restored instances leave ~170,000-190,000 tracked objects; calls that keep new
    containers alive (a packed call replaces hundreds of states) make Python run a full collection every few
    dozen calls, and each walked them all: ~100 ms, stopping every call (docs/benchmarks.md). Frozen, a full
    collection walks only what came later. Objects frozen are never collected as cyclic garbage: they are
    meant to live as long as the process."""
    gc.collect()
    gc.freeze()
    log.info("kept %d objects left by start-up out of the garbage collector's full collections",
             gc.get_freeze_count())


def warm_up() -> None:
    """Compile and run one tiny synapse so the first real call does not pay JAX's start-up."""
    registry = Registry()
    key = InstanceKey("local", "warmup")
    registry.create(key, kind="HebbianDeconvSynapse", config={"shape": [1, 1, 1, 1], "x_shape": [1, 1]})
    x = np.zeros((1, 1, 1, 1), np.float32)
    registry.call(key, "forward", {"inputs": x})
    registry.call(key, "evolve", {"pre": x, "post": x})


MAPS_LOOK_INTERVAL_S = 1.0  # after a compile, the process's memory maps are counted at most this often


def memory_maps() -> int | None:
    """How many memory mappings this process has (Linux; None elsewhere): ~1 ms per 1,000 to count."""
    try:
        with open("/proc/self/maps", "rb") as maps:
            return maps.read().count(b"\n")
    except OSError:
        return None


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (None with another C library)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()
_trims = 0  # times this process trimmed its heap (synapse_memory_trims_total)


def return_freed_memory() -> None:
    """Hand the memory freed in this process's C heap back to the kernel. glibc keeps what is freed in its pools:
    measured, 300 small programs released left the process 213 MB larger than once trimmed (~30 ms); a soak's
    server held 1,255 MB, 580 MB once trimmed."""
    global _trims
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
        _trims += 1


IDLE_LOOK_S = 1.0  # how often the idle trimmer looks at the process's CPU time
# CPU time of the whole process in one look below which it counts as idle: an idle server's own threads (the event
# loop's timers, the flusher, XLA's pools) took 20-30 ms a second on a 2-core AVX-512 VM, so a bound of 20 ms
# there never saw it idle (measured 2026-11-30); a server at work takes far more than 80 ms a second
IDLE_CPU_S = 0.08
TRIM_AFTER_CPU_S = 1.0  # CPU time spent since the last trim (work that may have freed memory) before another
# or the resident memory grown this much since it: a spell of idleness in the middle of work (a client slowed down
# on a loaded machine) had its trim come too early, and the work after it, under TRIM_AFTER_CPU_S, left its frees
# in the pools for good (a test's 42 MB of 82)
TRIM_AFTER_GROWTH_BYTES = 32 << 20


def resident_bytes() -> int:
    """This process's resident memory (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Periodic:
    """A daemon thread that calls ``look()`` every ``every_s`` seconds until stopped."""

    thread_name = "synapse-periodic"

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        self.started()
        while not self._stop.wait(self.every_s):
            self.look()

    def started(self) -> None:
        """On the thread, before the first look."""

    def look(self) -> Any:
        raise NotImplementedError


class CachePruner(Periodic):
    """Keeps the compilation cache's directory under ``max_bytes``: every ``every_s``, if its programs take more, the
    oldest written go until they take 90% of it. Every new batch size, config or sequence length is a new file, and
    the disk is the one sync writes need (a red-team run: 80 batch sizes, 80 files in 3 s, counted against nobody).
    A program pruned is compiled again when next needed (JAX finds no file: a miss, not an error)."""

    thread_name = "synapse-cache-pruner"

    def __init__(self, directory: Path, max_bytes: int, every_s: float) -> None:
        super().__init__(every_s)
        self.directory, self.max_bytes = directory, max_bytes
        self.pruned = 0

    def look(self) -> None:
        try:
            self.prune()
        except OSError as exc:  # a directory that cannot be read now: the next look tries again
            log.warning("could not prune the compilation cache: %s", exc)

    def prune(self) -> int:
        """One look: the bytes removed."""
        entries, total = [], 0
        with os.scandir(self.directory) as found:
            for entry in found:
                if entry.name.endswith("-cache") and entry.is_file(follow_symlinks=False):
                    stat = entry.stat(follow_symlinks=False)
                    entries.append((stat.st_mtime_ns, entry.path, stat.st_size))
                    total += stat.st_size
        if total <= self.max_bytes:
            return 0
        entries.sort()
        removed, keep = 0, self.max_bytes * 9 // 10
        for _, path, size in entries:
            if total - removed <= keep:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed += size
                self.pruned += 1
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path.removesuffix("-cache") + "-atime")
        return removed


class IdleTrimmer(Periodic):
    """Hands the memory freed in the C heap back to the kernel once the process goes idle after work.

    glibc keeps what is freed in its pools (its arenas): measured, a 150 s soak of fixed shapes left a server at
    1,291 MB resident, 625 MB once trimmed, and large calls (batches of 512-4,096 on a 256x256 dense synapse) left
    ~100 MB that a trim returned. A trim takes ~30 ms and holds the heap's locks, so it runs only when the process
    is idle (under ``IDLE_CPU_S`` of CPU in the last ``IDLE_LOOK_S``, all threads counted) and has worked since the
    last one (``TRIM_AFTER_CPU_S``) or grown since (``TRIM_AFTER_GROWTH_BYTES``): a busy server stays at the level
    its pools settle at, a server between bursts of work comes back down."""

    thread_name = "synapse-trimmer"

    def __init__(self, clock: Callable[[], float] = time.process_time,
                 trim: Callable[[], None] = return_freed_memory, resident: Callable[[], int] = resident_bytes) -> None:
        super().__init__(IDLE_LOOK_S)
        self.trims = 0
        self._clock, self._trim, self._resident = clock, trim, resident
        self._last, self._worked, self._trimmed_at = clock(), 0.0, resident()

    def start(self) -> None:
        if _MALLOC_TRIM is not None:  # no glibc: nothing to hand back
            super().start()

    def started(self) -> None:
        self._last, self._worked, self._trimmed_at = self._clock(), 0.0, self._resident()

    def look(self) -> bool:
        """One look (every ``IDLE_LOOK_S``): trim if the process was idle since the last look after work (or after
        growing since the last trim)."""
        now = self._clock()
        spent, self._last = now - self._last, now
        self._worked += spent
        if spent >= IDLE_CPU_S:
            return False
        if self._worked < TRIM_AFTER_CPU_S and self._resident() - self._trimmed_at < TRIM_AFTER_GROWTH_BYTES:
            return False
        self._trim()
        self.trims += 1
        self._last, self._worked, self._trimmed_at = self._clock(), 0.0, self._resident()  # its own CPU is not work
        return True


def kernel_map_limit() -> int | None:
    """The kernel's ``vm.max_map_count`` (Linux; None elsewhere): past it, the next mapping fails."""
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return None


class CompileStats:
    """XLA compiles and persistent-cache hits in this process, from JAX's monitoring events, and the bound on the
    programs it keeps.

    JAX keeps up to 8,192 compiled programs in each of its caches, and every XLA:CPU program holds memory and
    memory maps (measured here: ~4 maps and ~0.5 MB per small program, more for a large one): a client calling
    with a new batch size each time (each one a compile) could take a server to GBs and past the kernel's
    ``vm.max_map_count``, where the next compile crashes the process. So the process releases every program it
    holds (``jax.clear_caches()``) once more than ``max_compiled_programs`` were compiled or loaded since the last
    release, or once, after a compile, it holds more memory maps than its limit (counted at most once a second:
    counting costs ~1 ms per 1,000 maps); the ones still used compile again (from the persistent cache when it is
    on) on their next call.
    """

    def __init__(self) -> None:
        self.compilations = 0  # compiles and persistent-cache loads alike: JAX times both as a backend compile
        self.compile_seconds = 0.0
        self.cache_hits = 0
        self.since_release = 0  # programs compiled or loaded since the last release: those JAX may still hold
        self.releases = 0
        self.maps_counted: int | None = None  # at the last count
        self._counted_at = (-1, 0.0)  # (since_release, monotonic time) of the last count
        self._maps_left = 0  # what the last release for memory maps left
        self._release_lock = threading.Lock()
        jax.monitoring.register_event_duration_secs_listener(self._duration)
        jax.monitoring.register_event_listener(self._event)

    def _duration(self, event: str, seconds: float, **_: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.compilations += 1
            self.since_release += 1
            self.compile_seconds += seconds

    def release_if_over(self, budget: int, map_limit: int | None) -> bool:
        """Release every compiled program once more than ``budget`` were compiled or loaded since the last release,
        or the process holds more than ``map_limit`` memory maps (counted only after a compile; cheap otherwise:
        two comparisons). Safe beside calls running in other threads: JAX's caches are guarded by the GIL, and a
        program running keeps its own reference until it returns."""
        since = self.since_release
        if since <= budget:
            if map_limit is None or since == self._counted_at[0]:
                return False  # nothing compiled since the last count
            now = time.monotonic()
            if now - self._counted_at[1] < MAPS_LOOK_INTERVAL_S:
                return False
            self._counted_at = (since, now)
            self.maps_counted = memory_maps()
            # beyond the limit, and grown since the last release left them: maps the programs do not hold (a
            # server's many large arrays) must not make every compile release the programs again
            if self.maps_counted is None or self.maps_counted <= max(map_limit, self._maps_left + map_limit // 8):
                return False
            why = f"{self.maps_counted} memory maps, over the limit of {map_limit} (SYNAPSE_MAX_MEMORY_MAPS)"
        else:
            why = (f"{since} programs compiled or loaded since the last release, over "
                   f"SYNAPSE_MAX_COMPILED_PROGRAMS={budget}")
        releases = self.releases
        with self._release_lock:
            if self.releases != releases:  # another thread released them meanwhile
                return False
            jax.clear_caches()
            return_freed_memory()  # else the programs' memory stays the process's, in glibc's pools
            self.since_release = 0
            self._counted_at = (-1, 0.0)
            self._maps_left = (memory_maps() or 0) if since <= budget else 0
            self.releases += 1
        log.warning("released the compiled programs (release %d): %s; those still used compile again",
                    self.releases, why)
        return True

    def _event(self, event: str, **_: Any) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            self.cache_hits += 1


_compile_stats: CompileStats | None = None
_compile_stats_lock = threading.Lock()


def compile_stats() -> CompileStats:
    """The process's CompileStats (JAX's listeners are process-wide: registered once)."""
    global _compile_stats
    with _compile_stats_lock:
        if _compile_stats is None:
            _compile_stats = CompileStats()
        return _compile_stats


def _no_stop_iteration(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A StopIteration from a worker would leave its asyncio future pending forever (asyncio cannot carry it):
    it becomes a RuntimeError, which the API answers as a 500."""
    try:
        return fn(*args, **kwargs)
    except StopIteration as exc:
        raise RuntimeError(f"StopIteration escaped {getattr(fn, '__name__', fn)!r}") from exc


def registry_from(settings: Settings) -> Registry:
    """A registry with the settings' limits, state directory and durability mode."""
    limits = Limits(max_instances=settings.max_instances, max_instances_per_owner=settings.max_instances_per_owner,
                    max_state_bytes_per_owner=settings.max_state_bytes_per_owner,
                    max_snapshot_bytes_per_owner=settings.max_snapshot_bytes_per_owner,
                    max_batch=settings.max_batch, device_budget_bytes=settings.device_budget_bytes,
                    max_answer_bytes=settings.max_answer_bytes)
    return Registry(Capacity(limits), Persistence(Store(settings.state_dir), settings.durability),
                    answer_budget_bytes=settings.idempotency_answer_bytes, history_length=settings.history_length,
                    history_when_off=settings.history_when_durability_off)


class LocalBackend:
    """The Backend interface (backend.py) over a Registry in this process."""

    def __init__(self, settings: Settings, registry: Registry | None = None, *, in_caller_thread: bool = False
                 ) -> None:
        self.settings = settings
        self.in_caller_thread = in_caller_thread  # every coroutine completes without suspending (no loop needed)
        apply_dispatch_setting(settings)  # before the registry starts JAX
        self.registry = registry or registry_from(settings)
        # calls on different instances proceed side by side
        self.executor = ThreadPoolExecutor(max_workers=settings.worker_threads, thread_name_prefix="synapse-worker")
        # what waits for a worker waits here, on the loop, not on a worker: calls on one instance one at a time (they
        # would wait for its lock on a worker), and at most an owner's share of the workers at once. Without them, a
        # queue of calls behind a long one on one instance held every worker (a red-team run, 2026-11-30: another
        # owner's describe of its own instance took 5.3 s instead of 0.02), and with the share alone, the owner's
        # whole share (its calls on its other instances waited 4 s).
        self.instance_queues = Slots(1)
        self.owner_slots = Slots(settings.worker_threads_per_owner or max(1, settings.worker_threads // 4))
        self._off_loop = 0  # calls now on the worker threads (counted on the loop's thread)
        self.inline_max_s = settings.inline_call_us * 1e-6  # the inline bound (raised by measured hops)
        self._hops: deque[float] = deque(maxlen=HOPS_KEPT)  # seconds of recent hand-offs, their runs left out
        # (instance, operation, argument shapes, compartment shapes) -> seconds its last run took
        self._costs: OrderedDict[tuple, float] = OrderedDict()
        self._costs_lock = threading.Lock()
        self.compiles = compile_stats()
        self.trimmer = IdleTrimmer() if settings.trim_when_idle else None
        self.pruner = CachePruner(settings.state_dir / "jax-cache", settings.compilation_cache_max_bytes,
                                  settings.compilation_cache_prune_s) if settings.compilation_cache else None
        self._costs_release = self.compiles.releases  # the costs were measured since this release
        kernel = kernel_map_limit()  # half the kernel's: JAX, Python, threads and arenas map the rest
        self.map_limit = settings.max_memory_maps or (kernel // 2 if kernel else None)
        self._operations = frozenset(op for kind in KINDS.values() for op in kind.operations)

    async def _off(self, fn: Callable[..., Any], *args: Any, for_owner: str | None = None,
                   for_instance: InstanceKey | None = None, for_instances: Iterable[InstanceKey] = (),
                   **kwargs: Any) -> Any:
        """Run blocking registry work on the worker threads, never on the event loop (with no loop: here).
        ``for_instance``: work that holds that live instance's lock, one at a time (``instance_queues``; never work
        that brings an instance in or waits for one to come: a restore, a create, an import); ``for_instances``:
        work that holds the locks of these too (a packed call's, references' instances), taken in key order as the
        registry takes their locks; ``for_owner``: work of that owner's, on at most its share of the workers
        (``owner_slots``)."""
        if self.in_caller_thread:
            try:
                return fn(*args, **kwargs)
            finally:
                self._bound_programs()
        if for_instance is not None or for_instances:
            waits = sorted({*for_instances, *(() if for_instance is None else (for_instance,))})
            async with contextlib.AsyncExitStack() as queued:  # each in turn, on the loop: no worker held meanwhile
                for key in waits:
                    await queued.enter_async_context(self.instance_queues.held(key))
                return await self._off(fn, *args, for_owner=waits[0].owner, **kwargs)
        if for_owner is not None:
            async with self.owner_slots.held(for_owner):
                return await self._off(fn, *args, **kwargs)
        self._off_loop += 1
        alone = self._off_loop == 1  # no call before it on the workers: what is measured is the hop, not a queue
        ran = [0.0]
        handed = time.perf_counter()
        try:
            answer = await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(
                self._then_bound_programs, ran, fn, *args, **kwargs))
        finally:
            self._off_loop -= 1
        if alone and self._off_loop == 0:
            self._note_hop(time.perf_counter() - handed - ran[0])
        return answer

    def _then_bound_programs(self, ran: list[float], fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return _no_stop_iteration(fn, *args, **kwargs)
        finally:  # on the worker: a release (a few ms) never holds up the event loop
            self._bound_programs()
            ran[0] = time.perf_counter() - started

    def _note_hop(self, seconds: float) -> None:
        """One hand-off's cost (to a worker and back to the loop): the inline bound follows their median."""
        floor, factor = self.settings.inline_call_us * 1e-6, self.settings.inline_hop_factor
        if floor <= 0 or factor <= 0:  # inline calls off, or a fixed bound
            return
        self._hops.append(seconds)
        hop = sorted(self._hops)[len(self._hops) // 2]
        self.inline_max_s = max(floor, min(factor * hop, INLINE_CEILING_S))

    def _bound_programs(self) -> None:
        """Every compile happens in work that ends here (a call runs inline only once it ran with those shapes)."""
        self.compiles.release_if_over(self.settings.max_compiled_programs, self.map_limit)

    def busy(self) -> bool:
        return self._off_loop > 0

    # --- lifecycle ---

    async def start(self) -> None:
        if self.settings.compilation_cache:
            try:
                enable_compilation_cache(self.settings.state_dir / "jax-cache")
            except OSError as exc:  # a read-only state directory: served all the same, compiling at each start
                log.warning("no persistent compilation cache: %s", exc)
        self.registry.open()  # StateDirLocked if another server holds the directory

    async def get_ready(self, phase: Callable[[str], None]) -> None:
        phase("restoring instances")
        await self._off(self.registry.load_stored)
        phase("warming up")
        if self.settings.warmup:
            try:
                await self._off(warm_up)
            except Exception:  # a failed warm-up costs the first caller a compile, nothing else
                log.exception("warm-up failed; serving without it")
        if self.settings.gc_freeze:
            freeze_start_up_objects()
        self.registry.start_background(self.settings.flush_interval_s, self.settings.evict_idle_after_s)
        if self.trimmer is not None:
            self.trimmer.start()
        if self.pruner is not None:
            self.pruner.start()

    async def probe(self) -> None:
        if self.in_caller_thread:  # no loop to time it out on: the caller (a shard's front) bounds the wait
            return self.registry.capacity.probe()
        await asyncio.wait_for(self._off(self.registry.capacity.probe), PROBE_TIMEOUT_S)

    async def close(self) -> None:
        def shut_down() -> None:
            if self.trimmer is not None:
                self.trimmer.stop()
            if self.pruner is not None:
                self.pruner.stop()
            self.registry.persistence.stop()
            self.executor.shutdown(wait=True)  # calls in flight finish before the last write
            self.registry.close()

        if self.in_caller_thread:
            shut_down()
        else:
            await asyncio.get_running_loop().run_in_executor(None, shut_down)

    def storage_error(self) -> str | None:
        return self.registry.persistence.storage_error

    # --- kinds ---

    def kinds(self) -> list[dict[str, Any]]:
        return [{"name": k.name, "description": k.description, "operations": list(k.operations), "help": k.help(None)}
                for k in KINDS.values()]

    def kind_help(self, kind: str) -> dict[str, Any]:
        return get_kind(kind).help(None)

    def operation_names(self) -> frozenset[str]:
        return self._operations

    # --- instances ---

    async def create(self, key: InstanceKey, *, kind: str, config: Mapping[str, Any],
                     init: Mapping[str, Any] | None = None, seed: int = 0, durability: str | None = None,
                     device: str | int | None = None) -> dict[str, Any]:
        return await self._off(self.registry.create, key, for_owner=key.owner, kind=kind, config=config, init=init,
                               seed=seed, durability=durability, device=device)

    async def describe(self, key: InstanceKey) -> dict[str, Any]:
        return await self._off(self.registry.describe, key, for_owner=key.owner)

    async def help(self, key: InstanceKey) -> dict[str, Any]:
        return await self._off(self.registry.help, key, for_instance=key)

    async def stats(self, key: InstanceKey) -> dict[str, Any]:
        return await self._off(self.registry.learning_stats, key, for_instance=key)

    async def history(self, key: InstanceKey) -> dict[str, Any]:
        return await self._off(self.registry.history, key, for_instance=key)

    async def list(self, *, owner: str | None) -> list[dict[str, Any]]:
        return await self._off(self.registry.list, owner, for_owner=owner)

    async def delete(self, key: InstanceKey, *, expected_version: int | None = None) -> None:
        await self._off(self.registry.delete, key, expected_version, for_instance=key)

    async def call(self, key: InstanceKey, *, operation: str, tensors: Mapping[str, Any],
                   returns: list[str] | None = None, idempotency_key: str | None = None,
                   expected_version: int | None = None, sequence: Mapping[str, Any] | None = None,
                   stands_for: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``stands_for``: arguments whose values a front read from another shard's instance, each as the reference
        the caller sent (``[compartment, instance]``): a keyed call's fingerprint names the reference, as here."""
        run = functools.partial(self.registry.call, key, operation, tensors, returns,
                                idempotency_key=idempotency_key, expected_version=expected_version,
                                sequence=sequence, stands_for=stands_for)
        if self.in_caller_thread:
            try:
                return run()
            finally:
                self._bound_programs()
        if self._costs_release != self.compiles.releases:  # the programs were released: each call's next run
            with self._costs_lock:                          # compiles again, on a worker, never on the loop
                self._costs.clear()
                self._costs_release = self.compiles.releases
        cost_key = self._cost_key(key, operation, tensors, returns, sequence)
        if cost_key is not None and self._costs.get(cost_key, float("inf")) < self.inline_max_s:
            started = time.perf_counter()
            try:
                answer = run(wait=False, signature=cost_key[-1])
            except Busy:
                pass  # held by another call, or its shapes changed: to a worker
            else:
                self._remember_cost(cost_key, time.perf_counter() - started)
                return answer
        referred = _referred(key.owner, tensors)  # read under their locks: waited for here, not on a worker
        if cost_key is None:
            return await self._off(run, for_instance=key, for_instances=referred)

        def timed() -> dict[str, Any]:  # the run's own time, without the hop or the wait for the thread
            started = time.perf_counter()
            answer = run()
            self._remember_cost(cost_key, time.perf_counter() - started)
            return answer

        return await self._off(timed, for_instance=key, for_instances=referred)

    async def call_many(self, keys: list[InstanceKey], *, operation: str, tensors: list[Mapping[str, Any]],
                        returns: list[str] | None = None, idempotency_key: str | None = None
                        ) -> list[dict[str, Any]]:
        referred = [k for one in tensors if isinstance(one, Mapping) for k in _referred(keys[0].owner, one)] \
            if keys else []
        return await self._off(self.registry.call_many, keys, operation, tensors, returns,
                               for_instances=[*keys, *referred], idempotency_key=idempotency_key)

    async def call_stacked(self, keys: list[InstanceKey], *, operation: str, tensors: Mapping[str, Any],
                           returns: list[str] | None = None, idempotency_key: str | None = None) -> dict[str, Any]:
        referred = _referred(keys[0].owner, tensors) if keys else []
        return await self._off(self.registry.call_stacked, keys, operation, tensors, returns,
                               for_instances=[*keys, *referred], idempotency_key=idempotency_key)

    def _cost_key(self, key: InstanceKey, operation: str, tensors: Mapping[str, Any], returns: list[str] | None,
                  sequence: Mapping[str, Any] | None) -> tuple | None:
        """What a call's cost depends on — everything its program is compiled for: a call that differs in any of it
        may compile, and compiles run on a worker, never on the event loop — or None if it never runs inline
        (inline off, sync writes, other instances' compartments, a member of a stack). A cost is of one instance:
        another created, imported or brought back under the name (another config, programs not compiled yet) is
        measured anew, on a worker."""
        if self.inline_max_s <= 0:
            return None
        peek = self.registry.peek(key)
        if peek is None or peek[2]:
            return None
        shapes = []
        for name, value in sorted(tensors.items()):
            if isinstance(value, CompartmentRef):
                if value.instance is not None:
                    return None
                shapes.append((name, value.compartment))
            elif isinstance(value, np.ndarray):
                shapes.append((name, value.shape, value.dtype))
            elif value is not None:  # nothing decoded sends other values: whatever they are, not measured here
                return None
        every = None
        if sequence is not None:
            if not (isinstance(sequence, Mapping) and len(sequence) <= 2
                    and all(isinstance(k, str) and isinstance(v, int) for k, v in sequence.items())):
                return None  # not options the registry takes: it refuses them, with the reason, on a worker
            every = tuple(sorted(sequence.items()))
        if returns is not None and not (isinstance(returns, list) and all(isinstance(r, str) for r in returns)):
            return None
        returned = None if returns is None else tuple(returns)  # a sequence's program returns what is asked
        # the instance's serial, not its name's
        return peek[0], key, operation, tuple(shapes), returned, every, peek[1]

    def _remember_cost(self, cost_key: tuple, seconds: float) -> None:
        with self._costs_lock:  # workers remember costs too
            self._costs[cost_key] = seconds
            self._costs.move_to_end(cost_key)
            if len(self._costs) > COSTS_KEPT:
                self._costs.popitem(last=False)

    async def read(self, key: InstanceKey, *, compartment: str) -> tuple[np.ndarray, int]:
        return await self._off(self.registry.read, key, compartment, for_instance=key)

    async def write(self, key: InstanceKey, *, compartment: str, value: Any,
                    expected_version: int | None = None) -> int:
        return await self._off(self.registry.write, key, compartment, value, expected_version, for_instance=key)

    # --- files ---

    async def export(self, key: InstanceKey) -> ExportParts:
        return await self._off(self.registry.export, key, for_instance=key)

    async def import_(self, key: InstanceKey, *, blob: bytes) -> dict[str, Any]:
        return await self._off(self.registry.import_, key, blob, for_owner=key.owner)

    async def snapshot(self, key: InstanceKey, *, snapshot: str) -> dict[str, Any]:
        return await self._off(self.registry.snapshot, key, snapshot, for_instance=key)

    async def snapshots(self, key: InstanceKey) -> list[dict[str, Any]]:
        return await self._off(self.registry.snapshots, key, for_instance=key)

    async def rollback(self, key: InstanceKey, *, snapshot: str, expected_version: int | None = None) -> int:
        return await self._off(self.registry.rollback, key, snapshot, expected_version, for_instance=key)

    async def delete_snapshot(self, key: InstanceKey, *, snapshot: str) -> None:
        await self._off(self.registry.delete_snapshot, key, snapshot, for_instance=key)

    async def evicted(self, *, owner: str) -> list[dict[str, Any]]:
        return await self._off(self.registry.evicted, owner, for_owner=owner)

    async def unevict(self, key: InstanceKey) -> dict[str, Any]:
        return await self._off(self.registry.unevict, key, for_owner=key.owner)

    async def discard_evicted(self, key: InstanceKey) -> None:
        await self._off(self.registry.discard_evicted, key, for_owner=key.owner)

    # --- operators ---

    async def evict_idle(self, *, idle_s: float) -> dict[str, list[dict[str, Any]]]:
        stayed: list[dict[str, Any]] = []
        evicted = await self._off(self.registry.evict_idle, idle_s, None, stayed)
        return {"evicted": evicted, "stayed": stayed}

    async def storage(self) -> dict[str, Any]:
        return self.registry.storage_status()

    async def devices(self) -> list[dict[str, Any]]:
        return await self._off(self.registry.capacity.devices_info)

    async def gauges(self) -> dict[str, Any]:
        waiting = [(key.owner, n) for key, n in self.instance_queues.waiting().items()]  # read on the loop's thread
        waiting += list(self.owner_slots.waiting().items())
        stats = await self._off(self.registry.stats)  # walks every instance
        for owner, n in waiting:  # calls waiting for an instance, or for their owner's share, on the loop
            stats["queue_depth"][owner] = stats["queue_depth"].get(owner, 0) + n
        stats["memory"] = await self._off(self._memory)
        compiles = self.compiles
        stats["compiles"] = {"count": compiles.compilations, "seconds": compiles.compile_seconds,
                             "cache_hits": compiles.cache_hits, "releases": compiles.releases,
                             "since_release": compiles.since_release, "memory_maps": await self._off(memory_maps) or 0,
                             "memory_trims": _trims}
        return stats

    def _memory(self) -> dict[str, dict[str, int]]:
        out = {}
        for name, device in zip(self.registry.capacity.device_names(), self.registry.capacity.devices):
            stats = device.memory_stats()
            if stats:  # CPUs have none
                out[name] = {"in_use": stats.get("bytes_in_use", 0), "limit": stats.get("bytes_limit", 0)}
        return out

    def describe_setup(self) -> dict[str, Any]:
        store = self.registry.persistence.store
        return {"devices": self.registry.capacity.device_names(),
                "state_dir": str(store.root.resolve()) if store is not None else None,
                "durability": self.registry.persistence.durability}
