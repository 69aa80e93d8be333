"""Liveness and readiness of one shipper, served as ``/healthz`` and ``/readyz``.

``/metrics`` is served by its own thread, so it answers while the event loop
is wedged: it cannot tell the kubelet anything about the loop. These two can:

- ``/healthz`` (liveness): 200 while the main thread has made progress within
  ``health.stall_s`` -- the event loop completed an iteration (a long table
  dump beats too). Else 503 with a JSON reason. Two waits are not stalls and
  are reported as ``"status": "blocked"`` with 200: waiting for the sink under
  ``queue.overflow: block`` (backpressure by design; a restart would not cure
  it and would lose the in-memory queue), and the start-up Kubernetes sync
  wait (bounded by ``kubernetes.sync_timeout_s``).
- ``/readyz`` (readiness): 200 once every readiness condition is ok (the
  pipeline sets ``subscribed``, ``initial_dump``, ``pod_sync``, ``running``),
  else 503 naming the conditions that are not. The body always shows every
  condition and the extra facts given with :meth:`Health.set_info`.

``beat()`` is one clock read and one attribute store: the event loop calls it
once per iteration (not per event). The other methods are called rarely and
from any thread.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import orjson

# (status, headers, body)
Response = tuple[str, list[tuple[str, str]], bytes]

_JSON = [("Content-Type", "application/json")]


class Health:
    """Liveness (event-loop heartbeat) and readiness (named conditions) of the shipper."""

    def __init__(self, stall_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if stall_s <= 0:
            raise ValueError("stall_s must be > 0")
        self.stall_s = stall_s
        self._clock = clock
        self._last_beat = clock()  # start-up counts as progress until stall_s has passed
        self._blocked: str | None = None
        self._blocked_since = 0.0
        self._lock = threading.Lock()
        self._conditions: dict[str, tuple[bool, str]] = {}
        self._info: dict[str, Any] = {}

    # ---- written by the pipeline --------------------------------------------

    def beat(self) -> None:
        """The main thread made progress (the event loop calls this once per iteration)."""
        self._last_beat = self._clock()

    @contextlib.contextmanager
    def blocked(self, reason: str) -> Iterator[None]:
        """Mark a wait that is backpressure by design (not a stall) for its duration."""
        self._blocked_since = self._clock()
        self._blocked = reason
        try:
            yield
        finally:
            self._blocked = None
            self._last_beat = self._clock()

    def set_ready(self, name: str, ok: bool, reason: str = "") -> None:
        """Set readiness condition ``name``; ``/readyz`` is 200 only when all are ok."""
        with self._lock:
            self._conditions[name] = (bool(ok), reason)

    def set_info(self, key: str, value: Any) -> None:
        """Show a JSON-able fact under ``info`` in ``/readyz``; it does not affect readiness."""
        with self._lock:
            self._info[key] = value

    # ---- read by the probes -------------------------------------------------

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, body) of ``/healthz``."""
        now = self._clock()
        age = max(0.0, now - self._last_beat)
        blocked = self._blocked
        body: dict[str, Any] = {
            "stall_s": self.stall_s, "since_progress_s": round(age, 3)}
        if blocked is not None:
            body["status"] = "blocked"
            body["reason"] = (f"event loop waiting for {blocked} for "
                              f"{now - self._blocked_since:.1f} s (backpressure, not a stall)")
            return True, body
        if age > self.stall_s:
            body["status"] = "stalled"
            body["reason"] = (f"event loop completed no iteration for {age:.1f} s "
                              f"(health.stall_s = {self.stall_s:g})")
            return False, body
        body["status"] = "ok"
        return True, body

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, body) of ``/readyz``."""
        with self._lock:
            conditions = dict(self._conditions)
            info = dict(self._info)
        not_ok = [f"{n}: {r}" if r else n for n, (ok, r) in conditions.items() if not ok]
        body: dict[str, Any] = {
            "status": "ready" if not not_ok else "not_ready",
            "conditions": {n: {"ok": ok, "reason": r} for n, (ok, r) in conditions.items()},
            "info": info,
        }
        if not_ok:
            body["reason"] = "not ready: " + "; ".join(not_ok)
        return not not_ok, body

    def response(self, path: str) -> Response | None:
        """The HTTP response for ``/healthz`` or ``/readyz``; None for any other path."""
        if path == "/healthz":
            ok, body = self.liveness()
        elif path == "/readyz":
            ok, body = self.readiness()
        else:
            return None
        status = "200 OK" if ok else "503 Service Unavailable"
        return status, list(_JSON), orjson.dumps(body, default=str) + b"\n"

    def wsgi(self, fallback: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
        """A WSGI app serving ``/healthz`` and ``/readyz``, and ``fallback`` for other paths."""

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            resp = self.response(environ.get("PATH_INFO", ""))
            if resp is None:
                return fallback(environ, start_response)
            status, headers, body = resp
            if environ.get("REQUEST_METHOD") == "HEAD":
                body = b""
            start_response(status, headers)
            return [body]

        return app
