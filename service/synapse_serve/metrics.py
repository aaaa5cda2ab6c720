"""Prometheus metrics (prometheus-client) and the access log, from one middleware.

Updated per request::

    synapse_requests_total{method, route, status}             counter
    synapse_request_duration_seconds{method, route}           histogram
    synapse_operations_total{operation, status}               counter
    synapse_operation_duration_seconds{operation}             histogram

Read from the backend when scraped::

    synapse_compilations_total, synapse_compile_seconds_total, synapse_compilation_cache_hits_total
    synapse_instances{kind, owner}, synapse_queue_depth{owner}
    synapse_state_bytes{device}, synapse_device_budget_bytes
    synapse_device_memory_bytes_in_use{device}, synapse_device_memory_bytes_limit{device}  (GPUs)
    synapse_storage_failing

``route`` is the route template (``/v1/synapses/{name}/{operation}``), never the raw path, and no
label carries an instance name. Owner-labelled series are filtered for the scraper: an admin (or
anyone when auth is off) sees every owner, an owner only their own, an anonymous scraper
(``SYNAPSE_METRICS_OPEN``) totals with an empty owner.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from synapse_serve.auth import Principal
from synapse_serve.logs import ACCESS_FIELDS, access_fields

prometheus_client.disable_created_metrics()  # the _created series would double every counter for nothing
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
access_log = logging.getLogger("synapse_serve.access")
SERIES_CACHED = 4096


class Metrics:
    """The per-request series (one registry per server) and the rendering of a scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("synapse_requests", "HTTP requests by method, route template and status.",
                                ("method", "route", "status"), registry=self.registry)
        self.request_seconds = Histogram("synapse_request_duration_seconds", "Request duration by method and "
                                         "route template.", ("method", "route"), buckets=BUCKETS,
                                         registry=self.registry)
        self.operations = Counter("synapse_operations", "Operations (forward, evolve, ...) by outcome status.",
                                  ("operation", "status"), registry=self.registry)
        self.operation_seconds = Histogram("synapse_operation_duration_seconds", "Operation duration, decode to "
                                           "encode, by operation.", ("operation",), buckets=BUCKETS,
                                           registry=self.registry)
        # each labelled series, looked up once: labels() validates and locks on every call (~1.5 µs, per request)
        self._series: dict[tuple, tuple[Any, Any]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        count, duration = self._labelled(("request", method, route, status), self.requests,
                                         (method, route, str(status)), self.request_seconds, (method, route))
        count.inc()
        duration.observe(seconds)

    def observe_operation(self, operation: str, status: int, seconds: float) -> None:
        count, duration = self._labelled(("operation", operation, status), self.operations, (operation, str(status)),
                                         self.operation_seconds, (operation,))
        count.inc()
        duration.observe(seconds)

    def _labelled(self, key: tuple, counter: Counter, counted: tuple, histogram: Histogram, timed: tuple
                  ) -> tuple[Any, Any]:
        series = self._series.get(key)
        if series is None:
            series = counter.labels(*counted), histogram.labels(*timed)
            if len(self._series) < SERIES_CACHED:  # label values come from requests: never an unbounded cache
                self._series[key] = series
        return series

    def render(self, gauges: dict[str, Any] | None, principal: Principal | None) -> bytes:
        """The exposition text: the request series, then the backend's gauges as this scraper may see them."""
        text = prometheus_client.generate_latest(self.registry)
        if gauges is None:
            return text
        scrape = CollectorRegistry(auto_describe=False)
        scrape.register(_Gauges(gauges, principal))
        return text + prometheus_client.generate_latest(scrape)


class _Gauges:
    """A one-scrape collector of the backend's gauges, owner series filtered for ``principal``."""

    def __init__(self, gauges: dict[str, Any], principal: Principal | None) -> None:
        self.gauges, self.principal = gauges, principal

    def _owner_rows(self, rows: dict[Any, int], owner_of) -> dict[Any, int]:
        principal = self.principal
        if principal is not None and principal.admin:
            return rows
        if principal is not None:
            return {k: v for k, v in rows.items() if owner_of(k) == principal.owner}
        totals: dict[Any, int] = defaultdict(int)  # anonymous: totals, no owner names
        for k, v in rows.items():
            totals[_without_owner(k)] += v
        return totals

    def collect(self) -> Iterator[Metric]:
        g = self.gauges
        compiles = g["compiles"]
        yield CounterMetricFamily("synapse_compilations", "XLA compilations in this process.",
                                  value=compiles["count"])
        yield CounterMetricFamily("synapse_compile_seconds", "Time spent in XLA compilation.",
                                  value=compiles["seconds"])
        yield CounterMetricFamily("synapse_compilation_cache_hits", "Programs loaded from the persistent "
                                  "compilation cache.", value=compiles["cache_hits"])
        yield CounterMetricFamily("synapse_compiled_program_releases", "Times the process released every compiled "
                                  "program (SYNAPSE_MAX_COMPILED_PROGRAMS compiled since the last).",
                                  value=compiles["releases"])
        yield GaugeMetricFamily("synapse_compiled_programs_since_release", "Programs compiled or loaded since the "
                                "last release (what JAX may still hold).", value=compiles["since_release"])
        yield GaugeMetricFamily("synapse_memory_maps", "Memory mappings the process holds (Linux; the kernel's "
                                "vm.max_map_count caps them).", value=compiles["memory_maps"])
        yield CounterMetricFamily("synapse_memory_trims", "Times the process handed the memory its C heap freed "
                                  "back to the kernel (once idle after work, and after each release).",
                                  value=compiles["memory_trims"])
        instances = GaugeMetricFamily("synapse_instances", "Instances held, by kind and owner.",
                                      labels=("kind", "owner"))
        for (kind, owner), n in sorted(self._owner_rows(g["instances"], lambda k: k[1]).items()):
            instances.add_metric((kind, owner), n)
        yield instances
        queues = GaugeMetricFamily("synapse_queue_depth", "Calls waiting for an instance, by owner (owners with "
                                   "none are not listed).", labels=("owner",))
        for owner, n in sorted(self._owner_rows(g["queue_depth"], lambda k: k).items()):
            queues.add_metric((owner,), n)
        yield queues
        state = GaugeMetricFamily("synapse_state_bytes", "Bytes of instance state held, by device.",
                                  labels=("device",))
        for device, n in sorted(g["state_bytes"].items()):
            state.add_metric((device,), n)
        yield state
        if g["device_budget_bytes"] is not None:
            yield GaugeMetricFamily("synapse_device_budget_bytes", "State bytes each device may hold "
                                    "(SYNAPSE_DEVICE_BUDGET_BYTES).", value=g["device_budget_bytes"])
        if g["memory"]:
            in_use = GaugeMetricFamily("synapse_device_memory_bytes_in_use", "Device memory in use (JAX's "
                                       "allocator).", labels=("device",))
            limit = GaugeMetricFamily("synapse_device_memory_bytes_limit", "Device memory JAX may use.",
                                      labels=("device",))
            for device, memory in sorted(g["memory"].items()):
                in_use.add_metric((device,), memory["in_use"])
                limit.add_metric((device,), memory["limit"])
            yield in_use
            yield limit
        yield GaugeMetricFamily("synapse_storage_failing", "1 while instance files cannot be written.",
                                value=int(g["storage_failing"]))
        if g.get("shards"):  # the Ray backend: whether each shard answered this scrape
            shards = GaugeMetricFamily("synapse_shard_up", "1 while the shard actor answers (Ray backend).",
                                       labels=("shard",))
            for shard, up in sorted(g["shards"].items()):
                shards.add_metric((shard,), int(up))
            yield shards


def _without_owner(key: Any) -> Any:
    return (key[0], "") if isinstance(key, tuple) else ""


_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_label(method: str) -> str:
    """The method as a label: the API's own, else ``other`` (uvicorn answers some 30 methods, WebDAV's too, and each
    would be another series: a red-team sweep without a token took a scrape from 560 lines to 8,095)."""
    return method if method in _METHODS else "other"


class MetricsMiddleware:
    """Times every HTTP request: counts it by route template and status, and writes its access-log line.

    The log line (JSON with the server's formatter, logs.py): method, route, path, status, duration,
    request id, owner; no bodies, no tensor values. ``access_log=False`` leaves the lines out.
    """

    def __init__(self, app, metrics: Metrics, access_log: bool = True) -> None:
        self.app, self.metrics, self.access_log = app, metrics, access_log

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
            self.metrics.observe(method_label(scope["method"]), route, status[0], seconds)
            if self.access_log and access_log.isEnabledFor(logging.INFO):
                state = scope.get("state") or {}
                fields = access_fields(scope["method"], route, scope["path"], status[0], seconds,
                                       state.get("request_id"), state.get("owner"))
                access_log.info("%s %s %s", scope["method"], scope["path"], status[0], extra={ACCESS_FIELDS: fields})
