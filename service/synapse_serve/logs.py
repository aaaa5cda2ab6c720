"""JSON-lines logging: one object per line, for the access log and everything else the server says."""

from __future__ import annotations

import json
import logging
import sys

ACCESS_FIELDS = "fields"  # LogRecord attribute carrying an access line's fields


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", ...fields}``; an exception adds ``"error"``."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": round(record.created, 6), "level": record.levelname.lower(), "logger": record.name,
                "message": record.getMessage()}
        line.update(getattr(record, ACCESS_FIELDS, None) or {})
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(level: str) -> None:
    """The server's loggers (synapse_serve.*, uvicorn's errors) write JSON lines to stderr at ``level``.

    uvicorn's own access log is left off: synapse_serve.access writes one richer line per request.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name in ("synapse_serve", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False


def access_fields(method: str, route: str, path: str, status: int, seconds: float, request_id: str | None,
                  owner: str | None) -> dict:
    """The fields of one access-log line (no bodies, no tensor values)."""
    return {"method": method, "route": route, "path": path, "status": status,
            "duration_ms": round(seconds * 1e3, 3), "request_id": request_id, "owner": owner}
