"""bench/gpu_check.py runs end to end (on the CPU here: CI has no GPU) and its checks mean something."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_quick_run_checks_against_the_cpu_and_prints_the_table(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--quick", "--only", "small", "large-s2", "dense-784x512",
         "--min-seconds", "0.005", "--json", str(out)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout.rstrip().splitlines()
    assert table[-1].startswith("| large-s2 | bfloat16 | adjoint |")  # the table is printed last
    rows = json.loads(out.read_text())["rows"]
    assert {(r["size"], r["precision"], r["form"]) for r in rows} == {
        (s, p, f) for s in ("small", "large-s2") for p in ("highest", "default", "bfloat16") for f in ("vjp", "adjoint")
    } | {("dense-784x512", p, "dense") for p in ("highest", "default", "bfloat16")}
    for row in rows:
        assert row["forward_ms"] > 0 and row["evolve_ms"] > 0 and row["backtransmit_ms"] > 0
        if row["precision"] == "bfloat16":  # rounded operands: a real, small error
            assert 1e-4 < row["err_H"] < 2e-2
        else:  # same device as the reference: the same numbers (the adjoint form up to rounding)
            assert row["err_forward"] == 0 and row["err_dInputs"] == 0 and row["err_H"] < 1e-5
