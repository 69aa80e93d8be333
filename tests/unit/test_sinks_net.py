"""sinks/net.py Connections: the one open connection of a network sink, with failover."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from shipper.errors import SinkError
from shipper.metrics import Metrics
from shipper.sinks.net import Connections, Endpoint, StepFailure

log = logging.getLogger("test.sinks.net")


@dataclass
class FakeConn:
    sock: socket.socket
    endpoint: Endpoint
    peer: socket.socket


class Receivers:
    """Opens socket pairs for the endpoints that are up; records what was tried/closed."""

    def __init__(self) -> None:
        self.down: dict[str, StepFailure] = {}
        self.tried: list[str] = []
        self.closed: list[tuple[str, bool]] = []
        self.failures: list[tuple[str, str]] = []
        self.conns: list[FakeConn] = []
        self.now = 100.0

    def open(self, ep: Endpoint) -> FakeConn:
        self.tried.append(ep.label)
        if ep.label in self.down:
            raise self.down[ep.label]
        a, b = socket.socketpair()
        conn = FakeConn(a, ep, b)
        self.conns.append(conn)
        return conn

    def before_close(self, conn: FakeConn, broken: bool) -> None:
        self.closed.append((conn.endpoint.label, broken))

    def connections(self, metrics: Metrics) -> Connections[FakeConn]:
        return Connections(
            "forward", ["a:1", "b:2"], metrics=metrics, log=log, cooldown_s=30.0,
            clock=lambda: self.now, open=self.open, connected_fields=lambda: {"x": 1},
            before_close=self.before_close,
            on_failure=lambda ep, f: self.failures.append((ep.label, f.kind)))


@pytest.fixture
def rx() -> Iterator[Receivers]:
    r = Receivers()
    yield r
    for c in r.conns:
        c.sock.close()
        c.peer.close()


class TestConnections:
    def test_fails_over_counts_the_step_and_cools_the_receiver_down(self, rx: Receivers
                                                                       ) -> None:
        """A receiver whose connect fails is counted by error kind, reported to the sink,
        cooled down and passed over; the next one is used and stays the connection."""
        m = Metrics()
        conns = rx.connections(m)
        rx.down["a:1"] = StepFailure("connect", "refused")
        conn = conns.get()
        assert conn.endpoint.label == "b:2"
        assert rx.tried == ["a:1", "b:2"]
        assert m.value("shipper_forward_errors_total", "a:1", "connect") == 1
        assert m.value("shipper_forward_connections_total", "b:2") == 1
        assert m.value("shipper_forward_connected", "b:2") == 1
        assert m.value("shipper_forward_connected", "a:1") == 0
        assert rx.failures == [("a:1", "connect")]
        assert conns.get() is conn and rx.tried == ["a:1", "b:2"]
        # a:1 is back up but still cooling down: after b fails, a is tried.
        del rx.down["a:1"]
        conns.fail(conn, StepFailure("send", "write failed"))
        assert rx.closed == [("b:2", False)]
        assert m.value("shipper_forward_connected", "b:2") == 0
        assert conns.get().endpoint.label == "a:1"

    def test_cooling_receivers_are_tried_last_soonest_back_first(self, rx: Receivers) -> None:
        """With every receiver failing, all are tried and the error names each; the next
        attempt tries the healthy ones first."""
        conns = rx.connections(Metrics())
        rx.down["a:1"] = StepFailure("tls", "bad cert")
        rx.down["b:2"] = StepFailure("auth", "wrong key")
        with pytest.raises(SinkError, match=r"no forward receiver reachable: a:1: bad cert; "
                                             r"b:2: wrong key"):
            conns.get()
        rx.now += 10
        del rx.down["b:2"]
        rx.tried.clear()
        conns.get()
        assert rx.tried == ["a:1", "b:2"]  # both cooling until the same time: configured order

    def test_idle_connection_closed_by_peer_is_replaced(self, rx: Receivers) -> None:
        """A connection the receiver closed while idle is dropped as broken and a new one
        opened."""
        m = Metrics()
        conns = rx.connections(m)
        first = conns.get()
        first.peer.close()
        second = conns.get()
        assert second is not first
        assert rx.closed == [("a:1", True)]
        assert m.value("shipper_forward_connections_total", "a:1") == 2

    def test_failure_of_kind_closed_means_broken(self, rx: Receivers) -> None:
        """fail() with a ``closed`` failure tells the sink the peer broke the connection."""
        conns = rx.connections(Metrics())
        conns.fail(conns.get(), StepFailure("closed", "EOF"))
        assert rx.closed == [("a:1", True)]

    def test_abort_stops_new_connections(self, rx: Receivers) -> None:
        """After abort() no connection is opened; take() hands the current one over."""
        conns = rx.connections(Metrics())
        conn = conns.get()
        conns.abort()
        with pytest.raises(SinkError, match="forward sink is shutting down"):
            conns.get()
        taken, aborted = conns.take()
        assert taken is conn and aborted
        assert conns.take() == (None, True)
        conns.close(conn, broken=False)
        assert rx.closed == [("a:1", False)]
