"""The shipper's own logs: one JSON object per line on stderr.

Structured fields go in ``extra={"fields": {...}}``; they are emitted as
top-level keys, never spliced into the message text, so untrusted values
(pod labels, file names) cannot forge log lines.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson


class JsonFormatter(logging.Formatter):
    """Formats a record as ``{"ts", "level", "logger", "msg", ...fields}``."""

    def format(self, record: logging.LogRecord) -> str:
        """Render one log record as a JSON line."""
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            for k, v in fields.items():
                out.setdefault(k, v)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def setup(level: str = "info") -> None:
    """Send every ``shipper.*`` log to stderr as JSON lines at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("shipper")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


class LogLimit:
    """At most one log line per key and period: every occurrence is still counted in a
    metric, so a flood of bad input cannot flood the logs."""

    def __init__(self, per_s: float) -> None:
        self.per_s = per_s
        self._last: dict[str, float] = {}

    def allow(self, key: str) -> bool:
        """True if a line for ``key`` may be logged now (and it counts as logged)."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.per_s:
            return False
        self._last[key] = now
        return True
