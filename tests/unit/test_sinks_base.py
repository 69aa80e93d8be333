"""The Sink protocol: every sink declares its entry format, acknowledgement and abort."""

from __future__ import annotations

import io
import re
import typing
from pathlib import Path
from typing import Any

import msgpack
import orjson
import pytest

from shipper.config import Config
from shipper.metrics import Metrics
from shipper.sinks import Sink, build_sink
from shipper.sinks.base import Batch, EntryFormat
from shipper.sinks.stdout import StdoutSink

RECORD: dict[str, Any] = {"@timestamp": "2026-12-02T17:00:00.000000Z",
                          "event": {"action": "new"}, "host": {"name": "node-1"}}
T_NS = 1_796_230_800_000_000_000


def _sink(tmp_path: Path, kind: str, **sink: Any) -> Sink:
    extra: dict[str, Any] = {"file": {"path": str(tmp_path / "out.ndjson")}}
    if kind in ("forward", "syslog"):
        extra[kind] = sink
    cfg = Config(filter={"pod_cidrs": ["10.16.0.0/16"]}, sink={"type": kind, **extra})
    return build_sink(cfg, Metrics())


def _parse(fmt: str, entry: bytes) -> Any:
    """The record back out of one entry, read the way its declared format says."""
    if fmt == "ndjson":
        assert entry.endswith(b"\n") and entry.count(b"\n") == 1
        return orjson.loads(entry)
    if fmt == "msgpack":
        when, record = msgpack.unpackb(entry, raw=False, ext_hook=lambda code, data: code)
        assert when == 0  # EventTime is msgpack ext type 0
        return record
    assert re.match(rb"<\d{1,3}>1 ", entry)  # RFC 5424: <PRI>VERSION SP ...
    return orjson.loads(entry[entry.index(b" - ") + 3:])


class TestDeclaredCapabilities:
    @pytest.mark.parametrize(("kind", "fmt"), [("stdout", "ndjson"), ("file", "ndjson"),
                                               ("forward", "msgpack"), ("syslog", "rfc5424")])
    def test_entry_format_describes_what_encode_returns(self, tmp_path: Path, kind: str,
                                                         fmt: str) -> None:
        """Each sink's declared entry_format is the format its encode really produces."""
        sink = _sink(tmp_path, kind)
        try:
            assert sink.entry_format == fmt
            assert fmt in typing.get_args(EntryFormat)
            assert _parse(fmt, sink.encode(RECORD, T_NS)) == RECORD
        finally:
            sink.close()

    @pytest.mark.parametrize(("kind", "options", "acked"), [
        ("stdout", {}, False),
        ("file", {}, False),
        ("forward", {"ack": True}, True),
        ("forward", {"ack": False}, False),
        ("syslog", {"protocol": "relp"}, True),
        ("syslog", {"protocol": "tcp"}, False),
        ("syslog", {"protocol": "tls"}, False),
    ])
    def test_acknowledged_follows_the_protocol_in_use(self, tmp_path: Path, kind: str,
                                                      options: dict[str, Any],
                                                      acked: bool) -> None:
        """acknowledged is True only where deliver waits for the receiver's confirmation
        (forward with ack, syslog over RELP)."""
        sink = _sink(tmp_path, kind, **options)
        try:
            assert sink.acknowledged is acked
        finally:
            sink.close()

    def test_abort_of_a_local_sink_leaves_it_usable(self) -> None:
        """stdout's abort has nothing to interrupt: a later deliver still writes."""
        out = io.BytesIO()
        sink = StdoutSink(out)
        sink.abort()
        sink.deliver(Batch(seq=1, entries=[b"{}\n"], times=[T_NS], nbytes=3))
        assert out.getvalue() == b"{}\n"
