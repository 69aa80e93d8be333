"""ConntrackSource's burst pacing: a pause lets events gather, but never while events
are known to be queued (a burst that stopped at MAX_BURST)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from shipper.config import Config
from shipper.filters.cidr import CidrFilter
from shipper.metrics import Metrics
from shipper.record import FlowEvent
from shipper.sources import conntrack, events

DATA = Path(__file__).resolve().parents[1] / "data" / "ctnetlink_messages.json"
NEW_MSG = next(bytes.fromhex(m["hex"]) for m in json.loads(DATA.read_text())
               if m["label"].startswith("events/"))


@pytest.fixture
def source(monkeypatch: pytest.MonkeyPatch
           ) -> Iterator[tuple[events.ConntrackSource, socket.socket, list[float]]]:
    """A source whose event socket is one end of a datagram pair, with MAX_BURST 3 and
    time.sleep recorded (the pauses it takes) instead of slept."""
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    monkeypatch.setattr(conntrack, "open_event_socket", lambda *a, **kw: ours)
    monkeypatch.setattr(conntrack, "socket_drops", lambda netns, sock: 0)
    monkeypatch.setattr(events, "MAX_BURST", 3)
    slept: list[float] = []
    monkeypatch.setattr(events.time, "sleep", slept.append)
    cfg = Config(filter={"pod_cidrs": ["10.244.0.0/16"]},
                 conntrack={"kernel_filter": False, "drain_interval_ms": 20.0})
    src = events.ConntrackSource(cfg.conntrack, CidrFilter(["10.244.0.0/16"], []), Metrics(),
                                 lambda *a: None, lambda exc: None)
    src.open()
    try:
        yield src, peer, slept
    finally:
        peer.close()
        ours.close()


def test_default_pause_is_20ms() -> None:
    """The default pause between drains is 20 ms (docs/CONFIG.md, docs/BENCHMARK.md)."""
    assert Config(filter={"pod_cidrs": ["10.244.0.0/16"]}).conntrack.drain_interval_ms == 20.0


def test_pause_after_wakeup_then_no_pause_while_backlog(
        source: tuple[events.ConntrackSource, socket.socket, list[float]]) -> None:
    """With events queued, wait() pauses drain_interval_ms; after a burst cut at
    MAX_BURST it returns at once (no poll, no pause) until a burst empties the queue."""
    src, peer, slept = source
    got: list[FlowEvent] = []
    for _ in range(5):
        peer.send(NEW_MSG)
    src.wait(1000)
    assert slept == [0.02]
    assert src.read_burst(got.append) == 3  # cut at MAX_BURST: 2 still queued
    src.wait(1000)
    assert slept == [0.02], "paused although events were still queued"
    assert src.read_burst(got.append) == 2
    assert len(got) == 5
    peer.send(NEW_MSG)
    src.wait(1000)
    assert slept == [0.02, 0.02], "no pause once the queue had been emptied"
    assert src.read_burst(got.append) == 1


def test_no_pause_without_events(
        source: tuple[events.ConntrackSource, socket.socket, list[float]]) -> None:
    """A wait that times out with nothing queued does not pause on top."""
    src, _peer, slept = source
    src.wait(10)
    assert slept == []
