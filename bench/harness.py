"""What every benchmark here shares: interleaved timing, adaptive timing, machine lines, tables, ngclearn's Python.

Pure Python and numpy (``gpu_check.py`` runs on a GPU box with only jax, optax and numpy).
Benchmarks are run by hand; they are not timed tests.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
NGCLEARN_VENV = ROOT / ".bench" / "ngclearn-venv"
MiB = 1 << 20


def interleaved(candidates: dict[str, Callable[[], object]], rounds: int, calls: int) -> dict[str, float]:
    """Median seconds per call of each candidate over ``rounds`` rounds of ``calls`` calls, interleaved
    (so drift on a shared machine hits them alike).

    A candidate is either a zero-argument call (timed here) or an object with ``timed(calls)``
    returning seconds per call (one measured elsewhere, e.g. in ngclearn's process).
    """
    for run in candidates.values():  # compile, connect, warm
        run.timed(1) if hasattr(run, "timed") else run()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, run in candidates.items():
            if hasattr(run, "timed"):
                samples[name].append(run.timed(calls))
                continue
            start = time.perf_counter()
            for _ in range(calls):
                run()
            samples[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(values) for name, values in samples.items()}


def timed(fn: Callable[[], object], min_seconds: float, repeats: int = 5) -> float:
    """Median seconds per call of ``fn`` (which must block until done), over ``repeats`` loops of at least
    ``min_seconds`` each; the first call (compile, warm) is not counted."""
    fn()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < min_seconds / 4 or calls < 2:
        fn()
        calls += 1
    per_call = (time.perf_counter() - start) / calls
    n = max(1, int(min_seconds / max(per_call, 1e-7)))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - start) / n)
    return statistics.median(samples)


def rand(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def machine(extra: str = "") -> str:
    """The date and machine a measurement was taken on, for the docs."""
    return (f"Measured {date.today()} on {platform.machine()} ({os.cpu_count()} CPUs, "
            f"{platform.processor() or platform.platform()}), Python {platform.python_version()}{extra}.")


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ngclearn_python() -> Path:
    """ngclearn's Python: $NGCLEARN_PYTHON, else .bench/ngclearn-venv (created on first use, from pyenv's 3.12
    — the Python the reference vectors were made with — or else the newest 3.13+ found)."""
    if os.environ.get("NGCLEARN_PYTHON"):
        return Path(os.environ["NGCLEARN_PYTHON"])
    python = NGCLEARN_VENV / "bin" / "python"
    if python.exists():
        return python
    versions = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates = sorted(versions.glob("3.12.*/bin/python")) or sorted(versions.glob("3.1[3-9]*/bin/python"))
    base = str(candidates[-1]) if candidates else shutil.which("python3.12") or shutil.which("python3")
    # the JAX of this environment, so that bit-for-bit comparisons compare the same compiler
    pins = []
    for package in ("jax", "jaxlib"):
        try:
            pins.append(f"{package}=={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    print(f"creating {NGCLEARN_VENV} with {base} (ngclearn==3.2.3 {' '.join(pins)})", flush=True)
    subprocess.run([base, "-m", "venv", str(NGCLEARN_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "ngclearn==3.2.3", *pins], check=True)
    return python
