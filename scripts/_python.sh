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
  local extras="$1" stamp=".venv/.installed-$1" version constraints=()
  if [ ! -x .venv/bin/python ]; then
    "$(pick_python)" -m venv .venv
  fi
  # the versions CI passed with, for this Python (scripts/lock.sh refreshes them)
  version="$(.venv/bin/python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
  if [ -f "constraints/py$version.txt" ]; then
    constraints=(-c "constraints/py$version.txt")
  else
    echo "no constraints/py$version.txt: installing the newest versions (scripts/lock.sh pins them)" >&2
  fi
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || { [ ${#constraints[@]} -gt 0 ] && [ "${constraints[1]}" -nt "$stamp" ]; }; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q "${constraints[@]}" -e ".[$extras]"
    touch "$stamp"
  fi
}

ensure_chromium() {  # the browser tests drive the system's Chromium (Debian's package), never a downloaded one
  local name
  for name in chromium chromium-browser google-chrome; do
    command -v "$name" >/dev/null 2>&1 && return 0
  done
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium for the browser tests" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "no Chromium found: install your distribution's chromium package (the browser tests need it)" >&2
  fi
}
