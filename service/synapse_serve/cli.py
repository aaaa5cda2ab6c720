"""``synapse-serve``: start the server (one worker: the state lives in the process)."""

from __future__ import annotations

import argparse

DOCS = "docs/ in the repository: api.md, wire-format.md, conformance.md"


def main(argv: list[str] | None = None) -> None:
    """Parse flags (which override SYNAPSE_* settings) and run uvicorn."""
    from synapse_serve.settings import Settings

    parser = argparse.ArgumentParser(prog="synapse-serve", description=__doc__, epilog=f"Docs: {DOCS}")
    parser.add_argument("--host", help="address to listen on (SYNAPSE_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (SYNAPSE_PORT, default 8000)")
    parser.add_argument("--state-dir", help="state directory (SYNAPSE_STATE_DIR, default ./state)")
    parser.add_argument("--log-level", help="log level (SYNAPSE_LOG_LEVEL, default info)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    settings = Settings(**overrides)
    settings.state_dir.mkdir(parents=True, exist_ok=True)

    import uvicorn

    from synapse_serve.app import create_app

    from synapse_serve.app import UnsafeSettings

    try:
        app = create_app(settings)
    except UnsafeSettings as exc:
        parser.exit(2, f"synapse-serve: {exc}\n")
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(), workers=1)


if __name__ == "__main__":
    main()
