"""Multi-device placement, in a child pytest whose JAX sees 4 CPU devices (placement_cases.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_placement_budget_and_concurrency_across_four_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "placement_cases.py")],
        capture_output=True, text=True, env=env, cwd=HERE.parents[1], timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert re.search(r"\b6 passed\b", proc.stdout), proc.stdout[-2000:]
