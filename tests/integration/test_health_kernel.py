"""/healthz and /readyz of a real pipeline on the real kernel (lab namespaces).

The pipeline runs in this process (a thread) so that the test can freeze its
event loop and hold its initial dump; the probes are read over HTTP from the
same server that serves /metrics.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from shipper import config as config_mod
from shipper.lab import Lab
from shipper.metrics import Metrics, serve
from shipper.pipeline import Pipeline
from shipper.record import FlowEvent
from shipper.sources import conntrack

pytestmark = [pytest.mark.kernel, pytest.mark.lab(pods=1)]  # lab: tests/conftest.py


def probe(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def poll(fn: Callable[[], tuple[int, dict[str, Any]]], code: int, timeout: float,
         what: str) -> tuple[float, dict[str, Any]]:
    """Poll until ``fn`` answers ``code``; return (when, body)."""
    deadline = time.monotonic() + timeout
    last: tuple[int, dict[str, Any]] = (0, {})
    while time.monotonic() < deadline:
        last = fn()
        if last[0] == code:
            return time.monotonic(), last[1]
        time.sleep(0.05)
    raise AssertionError(f"{what}: no {code} within {timeout}s; last {last}")


class Running:
    """A pipeline running in a thread, with its HTTP server; stopped by :meth:`close`."""

    def __init__(self, lab: Lab, tmp: Path, stall_s: float) -> None:
        cfg = config_mod.load(None, {
            "node_name": "lab-node",
            "conntrack.netns": lab.gw,
            "filter.pod_cidrs": lab.pod_cidrs(),
            "filter.cluster_cidrs": lab.cluster_cidrs(),
            "sink.type": "file",
            "sink.file.path": str(tmp / "flows.json"),
            "batch.max_age_s": 0.2,
            "health.stall_s": stall_s,
        })
        self.pipeline = Pipeline(cfg, Metrics(CollectorRegistry()))
        self.server = serve(CollectorRegistry(), "127.0.0.1:0", self.pipeline.health)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.stop = threading.Event()
        self.rc: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.rc = self.pipeline.run(self.stop)

    def healthz(self) -> tuple[int, dict[str, Any]]:
        return probe(self.url + "/healthz")

    def readyz(self) -> tuple[int, dict[str, Any]]:
        return probe(self.url + "/readyz")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def running(lab: Lab, tmp_path: Path) -> Iterator[Callable[[float], Running]]:
    made: list[Running] = []

    def make(stall_s: float) -> Running:
        r = Running(lab, tmp_path, stall_s)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


class TestReadyz:
    def test_not_ready_until_the_initial_dump_is_done(
            self, running: Callable[[float], Running], monkeypatch: pytest.MonkeyPatch) -> None:
        """/readyz is 503 naming initial_dump while the dump runs (socket already
        subscribed), and 200 once it is done."""
        entered, release = threading.Event(), threading.Event()
        real_dump = conntrack.dump_table

        def held_dump(*args: Any, **kw: Any) -> Iterator[FlowEvent]:
            entered.set()
            release.wait(20)
            yield from real_dump(*args, **kw)

        monkeypatch.setattr(conntrack, "dump_table", held_dump)
        r = running(5.0)
        code, body = r.readyz()
        assert code == 503 and body["conditions"]["initial_dump"]["ok"] is False
        r.thread.start()
        assert entered.wait(20)
        code, body = r.readyz()
        assert code == 503
        assert body["conditions"]["subscribed"]["ok"] is True
        assert body["conditions"]["pod_sync"]["ok"] is True
        assert body["conditions"]["initial_dump"] == {
            "ok": False, "reason": "initial table dump not done"}
        assert "initial_dump" in body["reason"]
        release.set()
        _, body = poll(r.readyz, 200, 10, "/readyz after the dump")
        assert all(c["ok"] for c in body["conditions"].values())


class TestHealthz:
    def test_frozen_event_loop_turns_503_within_stall_s_plus_one(
            self, lab: Lab, running: Callable[[float], Running]) -> None:
        """A loop blocked inside handle() makes /healthz 503 within stall_s + 1 s, and 200
        again once it moves on."""
        stall_s = 1.0
        r = running(stall_s)
        freeze, frozen, thaw = threading.Event(), threading.Event(), threading.Event()
        real_handle = r.pipeline.handle

        def handle(ev: FlowEvent) -> None:
            if freeze.is_set() and not thaw.is_set():
                frozen.set()
                thaw.wait(20)
            real_handle(ev)

        r.pipeline.handle = handle  # type: ignore[method-assign]
        r.thread.start()
        poll(r.readyz, 200, 20, "/readyz")
        # Healthy while idle: the loop iterates every poll timeout even without events.
        idle_until = time.monotonic() + stall_s + 0.5
        while time.monotonic() < idle_until:
            assert r.healthz()[0] == 200
            time.sleep(0.1)
        lab.start_server("tcp", 8080)  # stopped by the lab
        try:
            freeze.set()
            lab.connect(0)
            assert frozen.wait(10), "no event reached handle()"
            t_frozen = time.monotonic()
            t_503, body = poll(r.healthz, 503, stall_s + 5, "/healthz while frozen")
            assert t_503 - t_frozen <= stall_s + 1
            assert body["status"] == "stalled"
            assert "event loop completed no iteration" in body["reason"]
        finally:
            thaw.set()
        poll(r.healthz, 200, 5, "/healthz after thaw")
