"""The ``synapse-serve`` console command starts a real server process, and device failures are 5xx."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import jax
import numpy as np
import pytest

from synapse_serve.errors import DeviceError
from synapse_serve.local.registry import device_call
from synapse_serve.testing import free_port


def test_console_command_serves(tmp_path):
    exe = shutil.which("synapse-serve", path=os.path.dirname(sys.executable)) or shutil.which("synapse-serve")
    assert exe, "the synapse-serve console script is not installed"
    port = free_port()
    state = tmp_path / "state"
    proc = subprocess.Popen([exe, "--port", str(port), "--state-dir", str(state), "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-2000:]
            time.sleep(0.2)
        assert state.is_dir()
        assert httpx.get(f"http://127.0.0.1:{port}/v1/kinds").status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        output = proc.stdout.read().decode()
        proc.stdout.close()
    # uvicorn shuts down gracefully, then re-raises the signal it caught
    assert code in (0, -signal.SIGTERM) and "Traceback" not in output


def test_help_flag():
    exe = shutil.which("synapse-serve", path=os.path.dirname(sys.executable)) or "synapse-serve"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--state-dir" in out.stdout and "Docs:" in out.stdout


def test_device_failures_become_500_problems(live_server, client, unique_name):
    def out_of_memory(*args):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.0TiB")

    with pytest.raises(DeviceError, match="the device failed: RESOURCE_EXHAUSTED") as info:
        device_call(out_of_memory)
    assert info.value.status == 500

    syn = client.create(unique_name, kind="HebbianDeconvSynapse", config={"shape": [1, 1, 1, 1], "x_shape": [1, 1]})
    registry = live_server.registry
    original = registry.call
    registry.call = lambda *a, **k: device_call(out_of_memory)
    try:
        r = httpx.post(f"{live_server.url}/v1/synapses/{unique_name}/forward",
                       json={"inputs": np.ones((1, 1, 1, 1)).tolist()})
    finally:
        registry.call = original
    assert r.status_code == 500 and r.headers["content-type"] == "application/problem+json"
    assert "Out of memory" in r.json()["detail"] and "Traceback" not in r.text
    assert syn.forward(np.ones((1, 1, 1, 1))).shape == (1, 1, 1, 1)  # still serving


def run_cli(*args, env_extra=None):
    exe = shutil.which("synapse-serve", path=os.path.dirname(sys.executable)) or "synapse-serve"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    return subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=120)


def test_check_reports_devices_settings_and_docs(tmp_path):
    import json

    proc = run_cli("check", "--state-dir", str(tmp_path), "--port", "9123")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["would_serve"] == "http://127.0.0.1:9123"
    assert report["devices"] and report["devices"][0]["device"].startswith("cpu:")
    assert report["auth"].startswith("off") and report["problems"] == []
    assert "operations.md" in report["docs"]
    assert "tokens" not in report["settings"]


@pytest.mark.skipif(sys.platform == "win32", reason="descriptor limits are POSIX")
def test_the_server_raises_its_descriptor_limit_and_bounds_connections_below_it(tmp_path):
    """A soft limit of 1,024 descriptors is common where the hard one is far higher; the server's process raises it
    (connections are bounded by what it leaves, less a quarter kept for the state directory, logs and JAX)."""
    import json
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip(f"a hard descriptor limit of {hard}")
    top = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    exe = shutil.which("synapse-serve", path=os.path.dirname(sys.executable)) or "synapse-serve"
    lowered = (f"import os, resource; resource.setrlimit(resource.RLIMIT_NOFILE, (256, {top})); "
               f"os.execv({exe!r}, [{exe!r}, 'check', '--state-dir', {str(tmp_path)!r}])")  # no fork hooks here
    proc = subprocess.run([sys.executable, "-c", lowered], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["max_connections"] == top - max(128, top // 4)
    told = run_cli("check", "--state-dir", str(tmp_path), env_extra={"SYNAPSE_MAX_CONNECTIONS": "50"})
    assert json.loads(told.stdout)["max_connections"] == 50


def test_check_names_what_would_stop_the_server(tmp_path):
    import json

    proc = run_cli("check", "--state-dir", str(tmp_path), "--host", "0.0.0.0")
    assert proc.returncode == 2
    assert "no tokens are configured" in json.loads(proc.stdout)["problems"][0]
    bad = run_cli("check", "--port", "99999")
    assert bad.returncode == 2 and "invalid settings" in bad.stderr and "port" in bad.stderr


def test_help_says_where_the_docs_are():
    proc = run_cli("--help")
    assert proc.returncode == 0 and "operations.md" in proc.stdout and "check" in proc.stdout
