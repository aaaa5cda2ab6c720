#!/usr/bin/env bash
# Set up .venv (first run only) and run the whole test suite. Extra args go to pytest.
source "$(dirname "$0")/_python.sh"
ensure_venv test
ensure_chromium
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
set +e
.venv/bin/python -m pytest "$@"
status=$?
# pytest exits 5 when it collected no tests: that must fail, never pass silently
[ "$status" -eq 5 ] && echo "pytest collected no tests" >&2
exit "$status"
