"""Helpers for tests and benchmarks: a synapse-serve server as a real OS process, to stop, kill -9 and restart."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``synapse-serve`` on a loopback port with its own state directory."""

    def __init__(self, state_dir: Path, durability: str = "interval", flush_interval_s: float = 2.0,
                 warmup: bool = False, **settings: object) -> None:
        """``settings`` are more server settings, e.g. ``max_body_bytes=1 << 30`` (SYNAPSE_MAX_BODY_BYTES)."""
        self.state_dir = Path(state_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "JAX_PLATFORMS": "cpu", "SYNAPSE_DURABILITY": durability,
                    "SYNAPSE_FLUSH_INTERVAL_S": str(flush_interval_s), "SYNAPSE_WARMUP": str(warmup).lower(),
                    "SYNAPSE_LOG_LEVEL": "warning",
                    **{f"SYNAPSE_{key.upper()}": str(value) for key, value in settings.items()}}
        self.exe = shutil.which("synapse-serve", path=os.path.dirname(sys.executable)) or "synapse-serve"
        self.proc: subprocess.Popen | None = None
        self.log = self.state_dir.parent / f"server-{self.port}.log"

    def start(self, timeout: float = 120) -> ServerProcess:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([self.exe, "--port", str(self.port), "--state-dir", str(self.state_dir)],
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> int:
        """SIGTERM and wait: a graceful shutdown."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=60)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
