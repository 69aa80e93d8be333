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


def _reference(datagrams: list[bytes]) -> tuple[list[FlowEvent], int]:
    """Events and decode errors of ``datagrams`` by LayoutDecoder.decode alone (the
    checked path for every message), message by message as read_burst walks them."""
    from shipper.errors import DecodeError
    from shipper.sources.decode import LayoutDecoder

    dec, got, errors = LayoutDecoder(), [], 0
    for d in datagrams:
        off = 0
        while off < len(d):
            try:
                ev, mlen = dec.decode(d, off, 0)
            except DecodeError:
                errors += 1
                break
            if ev is not None:
                got.append(ev)
            off += (mlen + 3) & ~3
    return got, errors


def test_burst_decodes_what_the_checked_path_decodes(
        source: tuple[events.ConntrackSource, socket.socket, list[float]]) -> None:
    """read_burst inlines the decoder's cached-layout fast path: on every captured
    kernel message, several to a datagram, cut short by its datagram (over the bytes a
    longer datagram left in the receive buffer), and with mutated attribute headers
    (other layouts under the same length, type and flags), it hands on exactly the
    events LayoutDecoder.decode gives on the datagram's own bytes and counts the same
    decode errors; so does the stop drain. A message cut short is an error, never an
    event completed from an older datagram's bytes."""
    import random

    src, peer, _slept = source
    msgs = [bytes.fromhex(m["hex"]) for m in json.loads(DATA.read_text())]
    pad = [m + b"\0" * (-len(m) % 4) for m in msgs]
    rnd = random.Random(8)
    datagrams = list(msgs)
    datagrams += [b"".join(pad[i:i + 4]) for i in range(0, len(pad), 4)]
    for i in range(len(msgs) - 1):  # whole, then cut short over the whole one's bytes
        cut = rnd.randrange(4, len(msgs[i + 1]))
        datagrams += [pad[i] + msgs[i + 1], pad[i] + msgs[i + 1][:cut]]
    for m in msgs * 3:  # one byte of an attribute header (or the family) changed
        b = bytearray(m)
        b[rnd.randrange(16, len(b))] ^= 1 << rnd.randrange(8)
        datagrams.append(bytes(pad[0]) + bytes(b))
    errors: list[Exception] = []
    src._on_decode_error = errors.append  # type: ignore[method-assign,assignment]
    got: list[FlowEvent] = []
    for i in range(0, len(datagrams), 8):
        for d in datagrams[i:i + 8]:
            peer.send(d)
        while src.read_burst(got.append):
            pass
    want, want_errors = _reference(datagrams)
    assert len(want) > len(msgs)  # the test exercises both paths
    assert want_errors > 0
    assert [ev._replace(received_ns=0) for ev in got] == want
    assert len(errors) == want_errors
    # The stop drain's per-datagram decode, in one buffer the datagrams overwrite.
    errors.clear()
    got.clear()
    buf = bytearray(1 << 16)
    for d in datagrams:
        buf[:len(d)] = d
        src._handle_datagram(buf, len(d), got.append)
    assert [ev._replace(received_ns=0) for ev in got] == want
    assert len(errors) == want_errors
