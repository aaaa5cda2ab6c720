#!/usr/bin/env bash
# Refresh constraints/py<major>.<minor>.txt: the exact versions a fresh install of the test extra resolves
# to today, for the Python given (default: the one the set-up scripts pick). The set-up scripts install
# with these constraints, so a fresh clone reproduces the set CI passed with; run this (for each Python
# you support), run ./scripts/test.sh, and commit the file when it passes.
#   ./scripts/lock.sh                  # the set-up scripts' Python
#   PYTHON=python3.11 ./scripts/lock.sh
source "$(dirname "$0")/_python.sh"
python="$(pick_python)"
version="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
"$python" -m venv "$scratch/venv"
"$scratch/venv/bin/python" -m pip install -q --upgrade pip
"$scratch/venv/bin/python" -m pip install -q ".[test]"
mkdir -p constraints
{
  echo "# Resolved $(date -u +%Y-%m-%d) for Python $version by scripts/lock.sh; used by scripts/_python.sh."
  "$scratch/venv/bin/python" -m pip freeze --exclude-editable | grep -v -i '^synapse-serve'
} > "constraints/py$version.txt"
echo "wrote constraints/py$version.txt ($(grep -vc '^#' "constraints/py$version.txt") packages)"
