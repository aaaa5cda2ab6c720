"""Shared fixtures: a real uvicorn server on an ephemeral loopback port."""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Iterator

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")


class LiveServer:
    """uvicorn serving ``create_app(settings)`` in a thread, on 127.0.0.1:<free port>."""

    def __init__(self, **settings: object) -> None:
        import uvicorn

        from synapse_serve.app import create_app, uvicorn_options
        from synapse_serve.settings import Settings

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        # in-process servers share the process: JAX's persistent cache and gc.freeze are tested in their own, and
        # a loop busy polling here would take the GIL from the test's client (tests/api/test_polling.py); no warm-up
        # compile at each start (JAX has started in this process already; ~0.2 s a server): tested where asked for
        self.settings = Settings(**{"compilation_cache": False, "gc_freeze": False, "busy_poll_us": 0, "warmup": False,
                                    **settings})
        self.app = create_app(self.settings)
        # a connection some test left open (a kept-alive socket, a session) must not hold the stop: the suite's
        # shared server waited the join's full 30 s for one at the end of every run
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5,
                                **uvicorn_options(self.settings))
        self.server = uvicorn.Server(config)
        self.exit_code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except SystemExit as exc:  # uvicorn's answer to a failed start-up (e.g. the state directory is taken)
            self.exit_code = exc.code

    def __enter__(self) -> LiveServer:
        return self.start(wait_ready=True)

    def start(self, wait_ready: bool = False) -> LiveServer:
        """Serve; return once uvicorn listens (and, with ``wait_ready``, once /readyz would say ready)."""
        self.thread.start()
        deadline = time.monotonic() + 60
        while not (self.server.started and (self.ready.is_set() or not wait_ready)):
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    @property
    def ready(self):
        """Set once the server would answer /readyz with 200."""
        return self.app.state.server.ready

    @property
    def registry(self):
        """The local backend's registry (tests reach into it to simulate busy instances and failures)."""
        return self.app.state.server.backend.registry


@pytest.fixture(scope="session")
def live_server(tmp_path_factory) -> Iterator[LiveServer]:
    with LiveServer(state_dir=tmp_path_factory.mktemp("state"), max_body_bytes=4 << 20) as server:
        yield server


@pytest.fixture
def client(live_server):
    from synapse_client import SynapseClient

    with SynapseClient(live_server.url) as c:
        yield c


_counter = iter(range(1_000_000))


@pytest.fixture
def unique_name(request) -> str:
    """An instance name no other test uses."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", f"t{next(_counter)}-{request.node.name[:40]}")


def metrics_of(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a Prometheus exposition, keyed by (name, labels) — the one parser the tests use."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    """One sample's value (0.0 when absent: Prometheus omits zero counters)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(autouse=True, scope="module")
def _compiled_programs_released_after_each_module() -> Iterator[None]:
    """Each XLA:CPU program JAX keeps maps ~3 regions of memory, and the kernel allows a process 65,530: the whole
    suite in one process compiled past that (tens of thousands of programs, most used by one test) and XLA
    crashed in whichever compile came next. A module's programs are released when it ends."""
    yield
    import jax

    jax.clear_caches()
