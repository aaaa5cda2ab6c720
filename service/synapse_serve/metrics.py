"""Prometheus metrics and the access log, from one middleware (no extra dependency).

Counters and histograms (updated per request)::

    synapse_requests_total{method, route, status}             counter
    synapse_request_duration_seconds{method, route}           histogram
    synapse_operations_total{operation, status}               counter
    synapse_operation_duration_seconds{operation}             histogram
    synapse_compilations_total, synapse_compile_seconds_total  counters (XLA backend compiles)
    synapse_compilation_cache_hits_total                      counter (persistent cache)

Gauges (read when scraped)::

    synapse_instances{kind, owner}, synapse_state_bytes{device}, synapse_device_budget_bytes
    synapse_queue_depth{owner, instance}  (only instances with calls waiting)
    synapse_device_memory_bytes_in_use{device}, synapse_device_memory_bytes_limit{device}  (GPUs)
    synapse_storage_failing

``route`` is the route template (``/v1/synapses/{name}/{operation}``), never the raw path;
instance names appear only in the queue gauge, and only while calls wait.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import defaultdict
from typing import Any

import jax

from synapse_serve.logs import ACCESS_FIELDS, access_fields

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
access_log = logging.getLogger("synapse_serve.access")


class Histograms:
    """Counts per label set and latency histograms, safe to update from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[tuple[str, ...], int] = defaultdict(int)
        self.buckets: dict[tuple[str, ...], list[int]] = defaultdict(lambda: [0] * (len(BUCKETS) + 1))
        self.sums: dict[tuple[str, ...], float] = defaultdict(float)

    def observe(self, count_labels: tuple[str, ...], time_labels: tuple[str, ...], seconds: float) -> None:
        with self._lock:
            self.counts[count_labels] += 1
            self.buckets[time_labels][bisect.bisect_left(BUCKETS, seconds)] += 1
            self.sums[time_labels] += seconds

    def render(self, name: str, count_help: str, count_names: tuple[str, ...], time_name: str, time_help: str,
               time_names: tuple[str, ...]) -> list[str]:
        lines = [f"# HELP {name} {count_help}", f"# TYPE {name} counter"]
        with self._lock:
            for labels, n in sorted(self.counts.items()):
                lines.append(f"{name}{{{_labels(count_names, labels)}}} {n}")
            lines += [f"# HELP {time_name} {time_help}", f"# TYPE {time_name} histogram"]
            for labels, counts in sorted(self.buckets.items()):
                base = _labels(time_names, labels)
                running = 0
                for bound, count in zip((*map(str, BUCKETS), "+Inf"), counts):
                    running += count
                    lines.append(f'{time_name}_bucket{{{base},le="{bound}"}} {running}')
                lines.append(f"{time_name}_sum{{{base}}} {self.sums[labels]:.6f}")
                lines.append(f"{time_name}_count{{{base}}} {running}")
        return lines


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    return ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class CompileStats:
    """XLA compiles and persistent-cache hits in this process, from JAX's monitoring events."""

    def __init__(self) -> None:
        self.compilations = 0
        self.compile_seconds = 0.0
        self.cache_hits = 0
        jax.monitoring.register_event_duration_secs_listener(self._duration)
        jax.monitoring.register_event_listener(self._event)

    def _duration(self, event: str, seconds: float, **_: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.compilations += 1
            self.compile_seconds += seconds

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


class Metrics:
    """Everything /metrics shows; request and operation series are updated as requests finish."""

    def __init__(self) -> None:
        self.requests = Histograms()
        self.operations = Histograms()
        self.compiles = compile_stats()

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.observe((method, route, str(status)), (method, route), seconds)

    def observe_operation(self, operation: str, status: int, seconds: float) -> None:
        self.operations.observe((operation, str(status)), (operation,), seconds)

    def render(self, registry: Any) -> str:
        lines = self.requests.render(
            "synapse_requests_total", "HTTP requests by method, route template and status.",
            ("method", "route", "status"), "synapse_request_duration_seconds",
            "Request duration by method and route template.", ("method", "route"))
        lines += self.operations.render(
            "synapse_operations_total", "Operations (forward, evolve, ...) by outcome status.",
            ("operation", "status"), "synapse_operation_duration_seconds",
            "Operation duration, decode to encode, by operation.", ("operation",))
        compiles = self.compiles
        lines += [
            "# HELP synapse_compilations_total XLA compilations in this process.",
            "# TYPE synapse_compilations_total counter", f"synapse_compilations_total {compiles.compilations}",
            "# HELP synapse_compile_seconds_total Time spent in XLA compilation.",
            "# TYPE synapse_compile_seconds_total counter",
            f"synapse_compile_seconds_total {compiles.compile_seconds:.6f}",
            "# HELP synapse_compilation_cache_hits_total Programs loaded from the persistent compilation cache.",
            "# TYPE synapse_compilation_cache_hits_total counter",
            f"synapse_compilation_cache_hits_total {compiles.cache_hits}",
        ]
        if registry is not None:
            lines += _registry_gauges(registry)
        return "\n".join(lines) + "\n"


def _registry_gauges(registry: Any) -> list[str]:
    stats = registry.stats()
    lines = ["# HELP synapse_instances Instances held, by kind and owner.", "# TYPE synapse_instances gauge"]
    lines += [f"synapse_instances{{{_labels(('kind', 'owner'), key)}}} {n}"
              for key, n in sorted(stats["instances"].items())]
    lines += ["# HELP synapse_state_bytes Bytes of instance state held, by device.",
              "# TYPE synapse_state_bytes gauge"]
    lines += [f'synapse_state_bytes{{device="{d}"}} {n}' for d, n in sorted(stats["state_bytes"].items())]
    if stats["device_budget_bytes"] is not None:
        lines += ["# HELP synapse_device_budget_bytes State bytes each device may hold (SYNAPSE_DEVICE_BUDGET_BYTES).",
                  "# TYPE synapse_device_budget_bytes gauge",
                  f"synapse_device_budget_bytes {stats['device_budget_bytes']}"]
    lines += ["# HELP synapse_queue_depth Calls waiting for an instance (instances with none are not listed).",
              "# TYPE synapse_queue_depth gauge"]
    lines += [f"synapse_queue_depth{{{_labels(('owner', 'instance'), tuple(key.split('/', 1)))}}} {n}"
              for key, n in sorted(stats["queue_depth"].items())]
    memory = [(f"{d.platform}:{d.id}", d.memory_stats()) for d in registry.devices]
    memory = [(name, m) for name, m in memory if m]  # CPUs have none
    if memory:
        lines += ["# HELP synapse_device_memory_bytes_in_use Device memory in use (JAX's allocator).",
                  "# TYPE synapse_device_memory_bytes_in_use gauge"]
        lines += [f'synapse_device_memory_bytes_in_use{{device="{n}"}} {m.get("bytes_in_use", 0)}' for n, m in memory]
        lines += ["# HELP synapse_device_memory_bytes_limit Device memory JAX may use.",
                  "# TYPE synapse_device_memory_bytes_limit gauge"]
        lines += [f'synapse_device_memory_bytes_limit{{device="{n}"}} {m.get("bytes_limit", 0)}' for n, m in memory]
    lines += ["# HELP synapse_storage_failing 1 while instance files cannot be written.",
              "# TYPE synapse_storage_failing gauge", f"synapse_storage_failing {int(bool(registry.storage_error))}"]
    return lines


class MetricsMiddleware:
    """Times every HTTP request: counts it by route template and status, and writes its access-log line.

    The log line (JSON with the server's formatter, logs.py): method, route, path, status, duration,
    request id, owner; no bodies, no tensor values.
    """

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe(scope["method"], route, status[0], seconds)
            if access_log.isEnabledFor(logging.INFO):
                state = scope.get("state") or {}
                fields = access_fields(scope["method"], route, scope["path"], status[0], seconds,
                                       state.get("request_id"), state.get("owner"))
                access_log.info("%s %s %s", scope["method"], scope["path"], status[0], extra={ACCESS_FIELDS: fields})
