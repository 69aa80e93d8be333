"""Pipeline._drain_at_stop (the source's stop drain): what the kernel queued is shipped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from shipper.config import Config
from shipper.metrics import Metrics
from shipper.pipeline import Pipeline
from shipper.sources import conntrack
from tests.fakes.sinks import BatcherSink

DATA = Path(__file__).resolve().parents[1] / "data" / "ctnetlink_messages.json"
MESSAGE = bytes.fromhex(next(m["hex"] for m in json.loads(DATA.read_text())
                             if m["label"] == "events/plain"))


class QueuedSocket:
    """The event socket with ``n`` datagrams queued (None: a sender that never pauses)."""

    def __init__(self, n: int | None) -> None:
        self.left = n
        self.reads = 0

    def recv_into(self, buf: bytearray) -> int:
        if self.left is not None:
            if self.left == 0:
                raise BlockingIOError
            self.left -= 1
        self.reads += 1
        buf[:len(MESSAGE)] = MESSAGE
        return len(MESSAGE)


def _pipeline(monkeypatch: pytest.MonkeyPatch, grace_s: float) -> Pipeline:
    monkeypatch.setattr(conntrack, "socket_drops", lambda netns, sock: None)
    monkeypatch.setattr(conntrack, "effective_rcvbuf", lambda sock: 1 << 30)
    cfg = Config(filter={"pod_cidrs": ["0.0.0.0/0", "::/0"]}, shutdown_grace_s=grace_s,
                 batch={"max_records": 1_000_000, "max_bytes": 1 << 30})
    return Pipeline(cfg, Metrics(), sink=BatcherSink(name="keep"))


@pytest.fixture
def pipeline(monkeypatch: pytest.MonkeyPatch) -> Pipeline:
    """A short grace period: the drain of a sender that never pauses must end soon."""
    return _pipeline(monkeypatch, 0.2)


@pytest.fixture
def patient(monkeypatch: pytest.MonkeyPatch) -> Pipeline:
    """A long grace period: a drain that ends by itself is never cut by a busy machine."""
    return _pipeline(monkeypatch, 30.0)


def shipped(p: Pipeline) -> list[dict[str, Any]]:
    b = p.batcher.flush()
    return [] if b is None else [orjson.loads(e) for e in b.entries]


class TestDrainAtStop:
    def test_queued_events_are_read_and_shipped(self, patient: Pipeline) -> None:
        """Every datagram queued at the stop becomes a record; no gap when all were read."""
        patient.source.sock = QueuedSocket(3)
        patient._drain_at_stop()
        recs = shipped(patient)
        assert [r["event"]["action"] for r in recs] == ["new"] * 3

    def test_unread_rest_is_reported_as_a_gap(self, pipeline: Pipeline) -> None:
        """A queue that does not empty within half of shutdown_grace_s ends the drain with a
        gap record of unknown size, after shipping what was read."""
        sock = QueuedSocket(None)
        pipeline.source.sock = sock
        pipeline._drain_at_stop()
        recs = shipped(pipeline)
        gaps = [r for r in recs if r["event"]["action"] == "gap"]
        assert len(gaps) == 1 and gaps[0]["flowlog"]["gap"]["lost_events"] is None
        assert len(recs) - 1 == sock.reads > 0

    def test_reads_no_more_than_the_socket_buffer(
            self, patient: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
        """The drain stops after one buffer's worth of bytes: later events came after the
        stop."""
        monkeypatch.setattr(conntrack, "effective_rcvbuf", lambda sock: 10 * len(MESSAGE))
        sock = QueuedSocket(None)
        patient.source.sock = sock
        patient._drain_at_stop()
        assert sock.reads == 10
        assert [r["event"]["action"] for r in shipped(patient)] == ["new"] * 10
