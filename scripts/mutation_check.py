"""Break the code on purpose, one line at a time, and check that the tests claiming to guard it fail.

Run by hand before resolving an issue (not in CI: each mutation runs its tests, minutes on 2 cores):

    .venv/bin/python scripts/mutation_check.py                 # every list under tests/
    .venv/bin/python scripts/mutation_check.py --only quota    # mutations whose name contains "quota"
    .venv/bin/python scripts/mutation_check.py --list          # what would run

The mutations live next to the tests they target, in ``tests/**/mutations.toml``::

    [[mutation]]
    name = "owner check skipped in the operation route"    # the guarantee it breaks
    file = "service/synapse_serve/api/server.py"
    find = "if not principal.admin:"                         # must occur exactly once
    replace = "if False:"
    tests = ["tests/security/test_owner_matrix.py"]         # pytest arguments

Each mutation is applied to a scratch copy of the tracked files (the checkout is never touched),
the named tests run against that copy, and the mutation is *killed* if they fail, *survived* if
they pass. Survivors are gaps: add or fix a test, then add the mutation here. Exits 1 if any
mutation survived or could not be applied.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load(only: str | None) -> list[dict]:
    mutations = []
    for path in sorted((ROOT / "tests").rglob("mutations.toml")):
        for entry in tomllib.loads(path.read_text()).get("mutation", []):
            missing = {"name", "file", "find", "replace", "tests"} - entry.keys()
            if missing:
                raise SystemExit(f"{path}: mutation {entry.get('name', '?')!r} lacks {sorted(missing)}")
            entry["list"] = str(path.relative_to(ROOT))
            if only is None or only.lower() in entry["name"].lower():
                mutations.append(entry)
    return mutations


def scratch_copy() -> Path:
    """The tracked files (and untracked, not ignored ones) in a temporary directory."""
    target = Path(tempfile.mkdtemp(prefix="mutants-"))
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for name in files:
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def pytest(tests: list[str], copy: Path, python: str, timeout: float) -> tuple[bool, str]:
    """Whether the tests pass against the scratch copy, and pytest's last line."""
    env = {**os.environ, "PYTHONPATH": f"{copy / 'service'}{os.pathsep}{copy / 'client'}",
           "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    try:
        proc = subprocess.run([python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                              cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"(timed out after {timeout:.0f} s)"
    return proc.returncode == 0, (proc.stdout.strip().splitlines() or [""])[-1]


def run(mutation: dict, copy: Path, python: str, timeout: float) -> tuple[str, float, str]:
    path = copy / mutation["file"]
    original = path.read_text()
    if original.count(mutation["find"]) != 1:
        return "not applied", 0.0, f"'find' occurs {original.count(mutation['find'])} times in {mutation['file']}"
    path.write_text(original.replace(mutation["find"], mutation["replace"]))
    started = time.monotonic()
    try:
        passed, tail = pytest(mutation["tests"], copy, python, timeout)
    finally:
        path.write_text(original)
    return ("SURVIVED" if passed else "killed"), time.monotonic() - started, tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="run the mutations whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutation's tests")
    args = parser.parse_args()
    mutations = load(args.only)
    if args.list or not mutations:
        for m in mutations:
            print(f"{m['name']}  [{m['file']}]  -> {' '.join(m['tests'])}")
        raise SystemExit(0 if mutations else "no mutations found")
    copy = scratch_copy()
    check = subprocess.run([sys.executable, "-c", "import synapse_serve; print(synapse_serve.__file__)"],
                           env={**os.environ, "PYTHONPATH": str(copy / "service")}, capture_output=True, text=True)
    if not check.stdout.startswith(str(copy)):
        raise SystemExit(f"the scratch copy does not shadow the installed package: {check.stdout or check.stderr}")
    rows = []
    try:
        baseline: dict[tuple[str, ...], tuple[bool, str]] = {}
        for m in mutations:  # a mutation is killed only by tests that pass without it
            tests = tuple(m["tests"])
            if tests not in baseline:
                baseline[tests] = pytest(list(tests), copy, sys.executable, args.timeout)
            if not baseline[tests][0]:
                rows.append(("baseline fails", m, 0.0, baseline[tests][1]))
                print(f"{'BASELINE':11} {0:6.1f}s  {m['name']}  (unmutated: {baseline[tests][1]})", flush=True)
                continue
            outcome, seconds, tail = run(m, copy, sys.executable, args.timeout)
            rows.append((outcome, m, seconds, tail))
            print(f"{outcome:11} {seconds:6.1f}s  {m['name']}  ({tail})", flush=True)
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    survived = [r for r in rows if r[0] != "killed"]
    print(f"\n{len(rows) - len(survived)} of {len(rows)} mutations killed"
          + (f"; not killed: {', '.join(r[1]['name'] for r in survived)}" if survived else ""))
    raise SystemExit(1 if survived else 0)


if __name__ == "__main__":
    main()
