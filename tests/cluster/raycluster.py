"""A Ray cluster for the tests, and servers whose backend is the Ray backend on it.

Ray's token authentication is on, as a deployment runs it (docs/scaling.md): the head, its workers
and this driver share one token. Ray reads these variables when it is imported, so this module
sets them first and every cluster test imports Ray from here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = uuid.uuid4().hex + uuid.uuid4().hex
import ray  # noqa: E402

from conftest import LiveServer  # noqa: E402
from synapse_serve.testing import free_port  # noqa: E402


@contextlib.contextmanager
def local_cluster() -> Iterator[None]:
    """A Ray cluster on loopback, started by Ray's own command in a process of its own (the test process has
    JAX's threads: it must not fork), joined by this process, and stopped at the end."""
    port = free_port()
    # a test process killed before its teardown (a CI job timed out, a run stopped by hand) must not leave the cluster
    # running: the head gets SIGTERM when this process dies, and `ray start --block` stops what it started
    # (util-linux's setpriv; without it, only a teardown stops the cluster)
    dies_with_us = [setpriv, "--pdeathsig", "TERM"] if (setpriv := shutil.which("setpriv")) else []
    ray_command = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    head = subprocess.Popen(
        [*dies_with_us, ray_command, "start", "--head", "--block",
         f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=4", "--num-gpus=0",
         "--include-dashboard=false", f"--object-store-memory={96 << 20}", "--disable-usage-stats"],
        env={**os.environ, "JAX_PLATFORMS": "cpu", "RAY_USAGE_STATS_ENABLED": "0"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                ray.init(address=f"127.0.0.1:{port}", log_to_driver=False, logging_level="ERROR")
                break
            except (ConnectionError, RuntimeError):  # not up yet (Ray's auth error is a RuntimeError too)
                if time.monotonic() > deadline or head.poll() is not None:
                    raise
                time.sleep(0.5)
        yield
    finally:
        ray.shutdown()
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started (the head only: with every process
        # of its group signalled at once it waited ~30 s for them, one after another)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)


def ray_server(state_dir, **settings) -> LiveServer:
    """A front (uvicorn, in this process) whose backend is two shards on the cluster, in a namespace of its own
    (or ``ray_namespace``'s: a second front of the same deployment)."""
    settings.setdefault("ray_namespace", f"test-{uuid.uuid4().hex[:12]}")
    settings.setdefault("ray_direct_host", "127.0.0.1")  # the shards' channels on loopback, where the tests knock
    settings.setdefault("ray_shards", 2)
    settings.setdefault("ray_pin_cpus", False)  # many servers share the test cluster's two cores (test_ray_pinning.py)
    settings.setdefault("ray_shard_cpus", 1)
    return LiveServer(state_dir=state_dir, backend="ray", ray_restart_timeout_s=90, **settings)


@contextlib.contextmanager
def serving(server: LiveServer) -> Iterator[LiveServer]:
    """The server serving; its shards and directory killed once it stops, however its test ends (a failed test
    that left them running held the cluster's cores, and the next module's shards waited for them)."""
    try:
        with server:
            yield server
    finally:
        stop_shards(server)


def stop_shards(server: LiveServer) -> None:
    """Kill a front's shards and directory for good (they are detached: they would outlive it)."""
    backend = server.app.state.server.backend
    for actor in (*backend.shards, backend.directory):
        ray.kill(actor, no_restart=True)
