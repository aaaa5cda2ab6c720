"""Prometheus metrics, written in the text exposition format (no extra dependency).

    synapse_requests_total{method, route, status}          counter
    synapse_request_duration_seconds{method, route}        histogram
    synapse_instances                                      gauge (scraped from the registry)
    synapse_storage_failing                                gauge, 1 while instance files cannot be written

``route`` is the route template (``/v1/synapses/{name}/{operation}``), never the raw path,
so names never become labels.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Request counters and latency histograms, safe to update from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)
        self.buckets: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0] * (len(BUCKETS) + 1))
        self.sums: dict[tuple[str, str], float] = defaultdict(float)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(method, route, str(status))] += 1
            self.buckets[(method, route)][bisect.bisect_left(BUCKETS, seconds)] += 1
            self.sums[(method, route)] += seconds

    def render(self, instances: int, storage_failing: bool) -> str:
        lines = ["# HELP synapse_requests_total HTTP requests by method, route template and status.",
                 "# TYPE synapse_requests_total counter"]
        with self._lock:
            for (method, route, status), n in sorted(self.requests.items()):
                lines.append(f'synapse_requests_total{{method="{method}",route="{route}",status="{status}"}} {n}')
            lines += ["# HELP synapse_request_duration_seconds Request duration by method and route template.",
                      "# TYPE synapse_request_duration_seconds histogram"]
            for (method, route), counts in sorted(self.buckets.items()):
                labels = f'method="{method}",route="{route}"'
                running = 0
                for bound, count in zip((*map(str, BUCKETS), "+Inf"), counts):
                    running += count
                    lines.append(f'synapse_request_duration_seconds_bucket{{{labels},le="{bound}"}} {running}')
                lines.append(f"synapse_request_duration_seconds_sum{{{labels}}} {self.sums[(method, route)]:.6f}")
                lines.append(f"synapse_request_duration_seconds_count{{{labels}}} {running}")
        lines += ["# HELP synapse_instances Instances held.", "# TYPE synapse_instances gauge",
                  f"synapse_instances {instances}",
                  "# HELP synapse_storage_failing 1 while instance files cannot be written.",
                  "# TYPE synapse_storage_failing gauge", f"synapse_storage_failing {int(storage_failing)}"]
        return "\n".join(lines) + "\n"


class MetricsMiddleware:
    """Times every HTTP request and counts it by route template and status."""

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
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe(scope["method"], route, status[0], time.perf_counter() - start)
