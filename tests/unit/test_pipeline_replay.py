"""Pipeline.run end to end without root: captured kernel messages in, records in a memory sink.

The conntrack socket is replaced by one end of a Unix datagram socket pair carrying
the real ctnetlink messages of ``tests/data/ctnetlink_messages.json``, and the table
dump by the captured dump messages; everything after the socket (decode, filter,
attribution, encode, batch, delivery, stop) is the shipper's own code.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from shipper.config import Config
from shipper.metrics import Metrics
from shipper.pipeline import Pipeline
from shipper.record import FlowEvent, PodMeta
from shipper.sinks.base import Batch, EntryFormat
from shipper.sources import conntrack
from shipper.sources.decode import LayoutDecoder

DATA = Path(__file__).resolve().parents[1] / "data" / "ctnetlink_messages.json"
MESSAGES = [(m["label"], bytes.fromhex(m["hex"])) for m in json.loads(DATA.read_text())]
POD_IP = int(ipaddress.ip_address("10.244.0.10"))  # the captured flows' pod address


class MemorySink:
    """An NDJSON sink that keeps every delivered line."""

    name = "memory"
    entry_format: EntryFormat = "ndjson"
    acknowledged = False

    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def encode(self, record: dict[str, Any], time_ns: int) -> bytes:
        return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)

    def deliver(self, batch: Batch) -> None:
        self.lines.extend(batch.entries)

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


def dumped(decoder: LayoutDecoder) -> Iterator[FlowEvent]:
    """The captured dump messages as the table dump yields them."""
    for label, msg in MESSAGES:
        if label.startswith("dump/"):
            out: list[FlowEvent] = []
            decoder.decode_dump(msg, len(msg), time.time_ns(), out)
            yield from out


def kept(events: list[FlowEvent]) -> list[tuple[str, int | None]]:
    """(action, conntrack id) of the IPv4 events from the pod address, in order."""
    return [(e.action, e.ct_id) for e in events if e.family == 4 and e.orig_src == POD_IP]


@pytest.fixture
def fake_kernel(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """The event socket's peer: what is sent on it is what the pipeline reads."""
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    monkeypatch.setattr(conntrack, "read_sysctls",
                        lambda netns: {"events": 1, "acct": 1, "timestamp": 1})
    monkeypatch.setattr(conntrack, "open_event_socket", lambda *a, **kw: ours)
    monkeypatch.setattr(conntrack, "socket_drops", lambda netns, sock: 0)
    monkeypatch.setattr(conntrack, "effective_rcvbuf", lambda sock: 1 << 20)
    monkeypatch.setattr(conntrack, "dump_table", lambda netns, decoder, **kw: dumped(decoder))
    try:
        yield peer
    finally:
        peer.close()
        ours.close()


def test_recorded_events_become_records_in_order(fake_kernel: socket.socket) -> None:
    """Every captured event from the pod address (dump first, then the events in the
    order the kernel sent them) becomes exactly one record naming the pod, resolved;
    the other events are filtered and counted."""
    cfg = Config(filter={"pod_cidrs": ["10.244.0.8/29"], "only_snat": False},
                 conntrack={"set_sysctls": False, "kernel_filter": False},
                 enrich={"resolve_wait_s": 0}, batch={"max_age_s": 0.05}, state_dir=None)
    m = Metrics()
    sink = MemorySink()
    p = Pipeline(cfg, m, sink=sink)
    p.index.update(PodMeta(namespace="shop", name="web", uid="u-web", ips=((4, POD_IP),),
                           phase="Running", created_ns=1).with_record_object(), 2)
    decoder = LayoutDecoder()
    events: list[FlowEvent] = []
    for label, msg in MESSAGES:
        if not label.startswith("dump/"):
            fake_kernel.send(msg)
            ev, _ = decoder.decode(msg, 0, 0)
            assert ev is not None
            events.append(ev)
    expected = kept(list(dumped(decoder))) + kept(events)
    assert len(expected) > 20 and len(expected) < len(events) + 10
    stop = threading.Event()
    rc: list[int] = []
    t = threading.Thread(target=lambda: rc.append(p.run(stop)))
    t.start()
    try:
        deadline = time.monotonic() + 20
        while len(sink.lines) < len(expected) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stop.set()
        t.join(20)
    assert rc == [0]
    recs = [orjson.loads(line) for line in sink.lines]
    assert [(r["event"]["action"], r["conntrack"]["id"]) for r in recs] == expected
    assert {(r["kubernetes"]["pod"]["name"], r["flowlog"]["attribution"]) for r in recs} == {
        ("web", "resolved")}
    n_events = sum(m.value("shipper_events_total", a) for a in ("new", "update", "destroy"))
    assert n_events == len(events)
    assert m.value("shipper_events_filtered_total", "source_not_pod") == len(events) + 10 - len(
        expected)
