#!/usr/bin/env bash
# Set up .venv (first run only) and start the server with embedded defaults:
# local CPU or GPU, state in ./state, http://127.0.0.1:8000. Extra args go to synapse-serve.
source "$(dirname "$0")/_python.sh"
ensure_venv server
exec .venv/bin/synapse-serve "$@"
