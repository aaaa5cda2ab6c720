"""``synapse-serve``: start the server (one worker: the state lives in the process), or check a set-up.

    synapse-serve [serve] [--host H] [--port P] [--state-dir D] [--log-level L]
    synapse-serve check   [the same flags]   validate settings, list devices, say what would be served
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DOCS = ("docs/ in the repository: operations.md (running, watching, sizing), api.md, wire-format.md, "
        "durability.md, security.md, benchmarks.md, conformance.md, architecture.md")
SERVER_EXTRA = ("the server needs its extra dependencies (FastAPI, uvicorn, JAX): "
                "pip install 'synapse-serve[server]' (from a checkout: pip install '.[server]'); "
                "the client alone needs only numpy, msgpack and httpx")


def _server_dependencies_missing() -> str | None:
    """The first missing server dependency, or None: a client-only install says what to install."""
    import importlib.util

    for module in ("pydantic_settings", "fastapi", "uvicorn", "jax", "optax", "prometheus_client", "websockets"):
        try:
            if importlib.util.find_spec(module) is None:
                return module
        except (ImportError, ValueError):
            return module
    return None


def main(argv: list[str] | None = None) -> None:
    """Parse the command and flags (flags override SYNAPSE_* settings); serve, or check and report."""
    parser = argparse.ArgumentParser(prog="synapse-serve", description=__doc__, epilog=f"Docs: {DOCS}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", choices=("serve", "check"), default="serve",
                        help="serve (the default) or check")
    parser.add_argument("--host", help="address to listen on (SYNAPSE_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (SYNAPSE_PORT, default 8000)")
    parser.add_argument("--state-dir", help="state directory (SYNAPSE_STATE_DIR, default ./state)")
    parser.add_argument("--log-level", help="log level (SYNAPSE_LOG_LEVEL, default info)")
    args = parser.parse_args(argv)
    missing = _server_dependencies_missing()
    if missing is not None:
        parser.exit(2, f"synapse-serve: {missing} is not installed; {SERVER_EXTRA}\n")
    command = args.command
    overrides = {k: v for k, v in vars(args).items() if v is not None and k != "command"}

    from pydantic import ValidationError

    from synapse_serve.settings import Settings

    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        parser.exit(2, f"synapse-serve: invalid settings:\n{exc}\n")

    from synapse_serve.local.backend import apply_memory_settings

    apply_memory_settings(settings)  # before JAX starts a backend
    if command == "check":
        sys.exit(check(settings))

    import uvicorn

    from synapse_serve.app import UnsafeSettings, create_app, uvicorn_options
    from synapse_serve.logs import configure_logging
    from synapse_serve.protocol import descriptor_limit
    from synapse_serve.store import StateDirLocked, Store

    try:
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        probe = Store(settings.state_dir)  # a friendly refusal; the server takes the lock itself at start
        probe.lock()
        probe.unlock()
        app = create_app(settings)
    except (UnsafeSettings, StateDirLocked, OSError) as exc:
        parser.exit(2, f"synapse-serve: {exc}\n")
    configure_logging(settings.log_level)
    descriptor_limit(raise_to_most=True)  # this process is the server's: its connections bound follows the limit
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(), workers=1,
                access_log=False, log_config=None, **uvicorn_options(settings))


def check(settings) -> int:
    """Print what would be served and whether it can be; 0 if it can, 2 if not."""
    import jax

    from synapse_serve.auth import UnsafeSettings, auth_mode, token_table
    from synapse_serve.protocol import connection_bound, descriptor_limit
    from synapse_serve.store import StateDirLocked, Store

    problems = []
    try:
        tokens = token_table(settings)
        auth = auth_mode(settings, tokens)
    except UnsafeSettings as exc:
        auth, problems = "refused", [str(exc)]
    try:
        devices = [{"device": f"{d.platform}:{d.id}", "kind": getattr(d, "device_kind", d.platform),
                    "memory_bytes_limit": (d.memory_stats() or {}).get("bytes_limit")} for d in jax.devices()]
    except RuntimeError as exc:
        devices, problems = [], [*problems, f"JAX found no usable device: {exc}"]
    state = Path(settings.state_dir)
    store = Store(state)
    if state.is_dir():
        try:
            store.lock()
            store.unlock()
        except StateDirLocked as exc:
            problems.append(str(exc))
    report = {
        "would_serve": f"http://{settings.host}:{settings.port}",
        "auth": auth,
        "state_dir": str(state.resolve()),
        "stored_instances": len(store.stored_keys()),
        "durability": settings.durability,
        "devices": devices,
        "device_budget_bytes": settings.device_budget_bytes,
        "evict_idle_after_s": settings.evict_idle_after_s or None,
        # what serving would see: the limit raised first, as the server's process does
        "max_connections": connection_bound(settings.max_connections, descriptor_limit(raise_to_most=True)),
        "settings": settings.model_dump(mode="json", exclude={"tokens"}),
        "docs": DOCS,
        "problems": problems,
    }
    print(json.dumps(report, indent=2))
    return 2 if problems else 0


if __name__ == "__main__":
    main()
