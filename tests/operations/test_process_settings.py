"""Process-wide settings the engine applies: what start-up leaves alive is kept out of Python's full collections.

Each runs in a process of its own (a real server, or a fresh interpreter): they change the whole
process, which the test process must not share.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

from synapse_client import SynapseClient
from synapse_serve.testing import ServerProcess


@pytest.mark.parametrize("freeze", [True, False])
def test_a_ready_server_keeps_start_up_objects_out_of_full_collections(tmp_path, freeze):
    with ServerProcess(tmp_path / "state", warmup=True, log_level="info", gc_freeze=freeze) as server, \
            SynapseClient(server.url) as client:
        client.create("a", kind="HebbianSynapse", config={"shape": [2, 2]})  # serving, so ready
    kept = re.findall(r"kept (\d+) objects left by start-up", server.log.read_text())
    if freeze:
        assert len(kept) == 1 and int(kept[0]) > 10_000, server.log.read_text()[-2000:]
    else:
        assert not kept


@pytest.mark.parametrize(("settings", "frozen"), [("", False), ("local_settings={'gc_freeze': True}", True)])
def test_the_in_process_mode_leaves_the_callers_gc_alone_unless_asked(settings, frozen):
    script = textwrap.dedent(
        f"""
        import gc
        from synapse_client import SynapseClient
        with SynapseClient("local", {settings}) as client:
            client.create("a", kind="HebbianSynapse", config={{"shape": [2, 2]}})
            print(gc.get_freeze_count())
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert (int(result.stdout.strip()) > 10_000) == frozen
