# Sourced by the set-up scripts: pick a Python >= 3.11, preferring 3.12
# (the version the golden vectors were made with), and build .venv with it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

pick_python() {
  local root candidates=("${PYTHON:-}" python3.12)
  root="$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")"
  candidates+=("$root"/versions/3.12.*/bin/python3 python3.13 python3.11 python3)
  for py in "${candidates[@]}"; do
    [ -n "$py" ] || continue
    if "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then
      echo "$py"; return 0
    fi
  done
  echo "need Python >= 3.11 (set PYTHON=/path/to/python3)" >&2; return 1
}

ensure_venv() {  # ensure_venv EXTRAS
  local extras="$1" stamp=".venv/.installed-$1"
  if [ ! -x .venv/bin/python ]; then
    "$(pick_python)" -m venv .venv
  fi
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e ".[$extras]"
    touch "$stamp"
  fi
}
