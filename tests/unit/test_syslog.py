"""syslog sink: RFC 5424 encoding and severity (pure), TCP loss accounting (pure), config and
CLI, and RELP delivery/retry against the librelp-profile fake. The real-rsyslog tests are in
``tests/integration/test_syslog_rsyslog.py``."""

from __future__ import annotations

import os
import re
from collections import deque
from pathlib import Path
from typing import Any

import orjson
import pytest

from shipper import cli
from shipper import config as config_mod
from shipper.config import SyslogSinkConfig, SyslogTLSConfig
from shipper.delivery import Delivery
from shipper.errors import ConfigError, SinkError
from shipper.metrics import Metrics
from shipper.sinks import build_sink
from shipper.sinks.base import Batch
from shipper.sinks.retry import RetryPolicy
from shipper.sinks.syslog import (
    SyslogSink,
    _Sent,
    _unreceived,
    header_field,
    octet_frame,
    severity,
)
from tests.fakes.relp_receiver import Plan, RelpReceiver

T0 = 1_764_662_611_123_456_000

RECORD: dict[str, Any] = {
    "@timestamp": "2025-12-02T08:03:31.123456Z",
    "event": {"kind": "event", "action": "new", "id": "node-1:7:new:1"},
    "host": {"name": "node-1"},
    "kubernetes": {"labels": {"note": 'qu"ote ü'}},
    "flowlog": {"attribution": "resolved", "schema_version": "1"},
}
# RFC 5424 (section 6) header, and a JSON MSG.
RFC5424 = re.compile(rb"^<(\d{1,3})>1 (\S+) (\S{1,255}) (\S{1,48}) (\S{1,128}) (\S{1,32}) - (.*)$",
                     re.S)


def _sink(**kw: Any) -> SyslogSink:
    kw.setdefault("connect_timeout_s", 1.0)
    kw.setdefault("ack_timeout_s", 1.0)
    return SyslogSink(SyslogSinkConfig(**kw), Metrics())


def _batch(sink: SyslogSink, n: int, first: int = 0) -> Batch:
    entries = [sink.encode({**RECORD, "n": i}, T0) for i in range(first, first + n)]
    return Batch(seq=1, entries=entries, times=[T0] * n, nbytes=sum(map(len, entries)))


class TestEncode:
    def test_message_is_rfc5424_with_the_json_record_as_msg(self) -> None:
        """PRI, version 1, the record's @timestamp and host.name, APP-NAME, PID, the action
        as MSGID, no structured data, and the record's exact JSON as MSG."""
        sink = _sink(app_name="flowlog", facility="local4")
        msg = sink.encode(RECORD, T0)
        m = RFC5424.match(msg)
        assert m is not None
        pri, ts, host, app, procid, msgid, body = m.groups()
        assert int(pri) == 20 * 8 + 6
        assert ts == b"2025-12-02T08:03:31.123456Z"
        assert (host, app, procid, msgid) == (b"node-1", b"flowlog", str(os.getpid()).encode(),
                                              b"new")
        assert body == orjson.dumps(RECORD)
        assert not body.startswith(b"\xef\xbb\xbf")  # no BOM

    def test_timestamp_from_event_time_when_the_record_has_none(self) -> None:
        """A record without @timestamp gets the event time in RFC 3339."""
        rec = {k: v for k, v in RECORD.items() if k != "@timestamp"}
        m = RFC5424.match(_sink().encode(rec, T0))
        assert m is not None and m.group(2) == b"2025-12-02T08:03:31.123456Z"

    @pytest.mark.parametrize(("record", "sev"), [
        ({"event": {"kind": "pipeline_error", "action": "gap"}}, 4),
        ({"event": {"kind": "event"}, "flowlog": {"attribution": "unresolved"}}, 5),
        ({"event": {"kind": "event"}, "flowlog": {"attribution": "uncertain"}}, 5),
        ({"event": {"kind": "event"}, "flowlog": {"attribution": "stale"}}, 5),
        ({"event": {"kind": "event"}, "flowlog": {"attribution": "resolved"}}, 6),
        ({"event": {"kind": "event"}}, 6),
    ])
    def test_severity_mapping(self, record: dict[str, Any], sev: int) -> None:
        """gap is a warning, a flow whose pod is not known for sure a notice, others info."""
        assert severity(record) == sev

    def test_header_fields_are_printable_ascii(self) -> None:
        """Spaces and non-ASCII become ``_``, length is capped, empty is the NILVALUE."""
        assert header_field("node 1/ü", 255) == b"node_1/__"
        assert header_field("x" * 300, 255) == b"x" * 255
        assert header_field("", 32) == b"-"
        assert header_field(None, 32) == b"-"

    def test_odd_hostname_keeps_the_header_parseable(self) -> None:
        """A host.name with a space does not shift the header fields."""
        m = RFC5424.match(_sink().encode({**RECORD, "host": {"name": "a b"}}, T0))
        assert m is not None and m.group(3) == b"a_b"

    def test_octet_counting(self) -> None:
        """RFC 6587: each message as ``LEN SP MSG``, LEN in bytes (UTF-8)."""
        assert octet_frame([b"ab", "ü".encode()]) == b"2 ab2 \xc3\xbc"


class TestLossAccounting:
    def test_plain_tcp_counts_records_past_the_acked_offset(self) -> None:
        """Without TLS, records whose last byte is past what the peer acked are lost."""
        sent = deque([_Sent(100, [50, 50], True), _Sent(160, [30, 30], True)])
        assert _unreceived(sent, 100) == 2
        assert _unreceived(sent, 129) == 2
        assert _unreceived(sent, 130) == 1
        assert _unreceived(sent, 160) == 0

    def test_tls_counts_a_partly_acked_batch_whole(self) -> None:
        """With TLS the offsets are of TLS records: a partly acked batch counts whole."""
        assert _unreceived(deque([_Sent(160, [30, 30], False)]), 150) == 2

    def test_unknown_acked_offset_counts_everything(self) -> None:
        """Without TCP_INFO every unconfirmed record counts."""
        assert _unreceived(deque([_Sent(160, [30, 30], True)]), None) == 2


class TestConfig:
    def _load(self, **over: Any) -> config_mod.Config:
        o = {"filter.pod_cidrs": ["10.16.0.0/16"], "sink.type": "syslog"}
        o.update({f"sink.syslog.{k}": v for k, v in over.items()})
        return config_mod.load(None, o)

    def test_defaults(self) -> None:
        """RELP to 127.0.0.1:2514, facility local0, app flowlog-shipper, TLS verified."""
        c = self._load().sink.syslog
        assert (c.protocol, c.addresses, c.facility, c.app_name) == (
            "relp", ["127.0.0.1:2514"], "local0", "flowlog-shipper")
        assert c.tls.verify is True

    def test_udp_is_not_offered(self) -> None:
        """protocol udp is a config error naming the key."""
        with pytest.raises(ConfigError, match=r"sink\.syslog\.protocol"):
            self._load(protocol="udp")

    @pytest.mark.parametrize(("key", "value"), [
        ("app_name", "has space"), ("app_name", "x" * 49), ("facility", "local8"),
        ("addresses", ["nohost"]), ("relp_window", 0), ("unknown", 1),
    ])
    def test_bad_values_are_errors(self, key: str, value: Any) -> None:
        """Each bad value is reported with its key."""
        with pytest.raises(ConfigError, match=re.escape(f"sink.syslog.{key}")):
            self._load(**{key: value})

    def test_relp_tls_needs_relp(self) -> None:
        """relp_tls with protocol tcp is an error."""
        with pytest.raises(ConfigError, match="relp_tls needs protocol relp"):
            self._load(protocol="tcp", relp_tls=True)

    def test_cli_flags(self) -> None:
        """--syslog-address (repeatable) and --syslog-protocol set their keys and imply the
        syslog sink."""
        args = cli.build_parser().parse_args([
            "run", "--syslog-address", "a:1", "--syslog-address", "[::1]:2",
            "--syslog-protocol", "tls"])
        o = cli.overrides_from_args(args)
        assert o["sink.syslog.addresses"] == ["a:1", "[::1]:2"]
        assert o["sink.syslog.protocol"] == "tls"
        assert o["sink.type"] == "syslog"

    def test_build_sink(self) -> None:
        """sink.type syslog builds the syslog sink."""
        assert isinstance(build_sink(self._load(), Metrics()), SyslogSink)

    def test_missing_ca_file_is_a_start_error(self, tmp_path: Path) -> None:
        """An unreadable CA file fails at construction, not retriable."""
        with pytest.raises(SinkError) as ei:
            _sink(protocol="tls", tls=SyslogTLSConfig(ca_file=tmp_path / "nope.crt"))
        assert not ei.value.retriable


class TestRelpDelivery:
    def test_batch_counts_as_delivered_after_every_ack(self) -> None:
        """deliver returns after all acks; sent and acked metrics match."""
        rx = RelpReceiver()
        m = Metrics()
        try:
            sink = SyslogSink(SyslogSinkConfig(addresses=[rx.address]), m)
            b = _batch(sink, 40)
            sink.deliver(b)
            assert rx.acked == b.entries
            sink.close()
        finally:
            rx.close()
        assert m.value("shipper_syslog_records_acked_total", rx.address) == 40
        assert m.value("shipper_syslog_records_sent_total", rx.address) == 40

    def test_retry_after_a_broken_session_sends_only_the_unacked_rest(self) -> None:
        """The session ends after 15 acks: deliver fails (retriable); the retry of the same
        batch sends only messages 16..40, so nothing is acked twice."""
        rx = RelpReceiver(plans=[Plan(ack_then_close=15)])
        m = Metrics()
        try:
            sink = SyslogSink(SyslogSinkConfig(addresses=[rx.address], endpoint_cooldown_s=0),
                              m)
            b = _batch(sink, 40)
            with pytest.raises(SinkError) as ei:
                sink.deliver(b)
            assert ei.value.retriable
            sink.deliver(b)
            sink.close()
        finally:
            rx.close()
        assert rx.acked == b.entries
        assert m.value("shipper_syslog_records_acked_total", rx.address) == 40
        assert m.value("shipper_syslog_errors_total", rx.address, "closed") == 1

    def test_a_different_batch_is_sent_whole(self) -> None:
        """The remembered acked prefix belongs to one batch object only."""
        rx = RelpReceiver(plans=[Plan(ack_then_close=5)])
        try:
            sink = SyslogSink(SyslogSinkConfig(addresses=[rx.address], endpoint_cooldown_s=0),
                              Metrics())
            with pytest.raises(SinkError):
                sink.deliver(_batch(sink, 10))
            other = _batch(sink, 10, first=100)
            sink.deliver(other)
            sink.close()
        finally:
            rx.close()
        assert rx.acked[5:] == other.entries

    def test_failover_to_the_next_address(self) -> None:
        """A refused first address is skipped; the batch goes to the second."""
        import socket as s

        with s.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            dead = f"127.0.0.1:{probe.getsockname()[1]}"
        rx = RelpReceiver()
        m = Metrics()
        try:
            sink = SyslogSink(SyslogSinkConfig(addresses=[dead, rx.address]), m)
            sink.deliver(_batch(sink, 3))
            sink.close()
        finally:
            rx.close()
        assert len(rx.acked) == 3
        assert m.value("shipper_syslog_errors_total", dead, "connect") == 1

    def test_not_a_relp_listener(self) -> None:
        """A listener that answers open with non-RELP bytes is a clear, retriable error."""
        import socket as s
        import threading

        lsock = s.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)

        def serve() -> None:
            c, _ = lsock.accept()
            c.recv(1000)
            c.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            c.close()

        t = threading.Thread(target=serve)
        t.start()
        try:
            sink = _sink(addresses=[f"127.0.0.1:{lsock.getsockname()[1]}"])
            with pytest.raises(SinkError, match="RELP open failed") as ei:
                sink.deliver(_batch(sink, 1))
            assert ei.value.retriable
        finally:
            t.join(5)
            lsock.close()


class TestTooLarge:
    def test_oversized_records_are_dropped_and_counted_not_sent(self) -> None:
        """A record longer than max_message_bytes is not sent; Delivery counts it dropped
        (too_large) and the other records of its batch shipped."""
        rx = RelpReceiver()
        m = Metrics()
        try:
            sink = SyslogSink(SyslogSinkConfig(addresses=[rx.address], max_message_bytes=1024),
                              m)
            entries = [sink.encode({**RECORD, "pad": "x" * (2000 if i == 2 else 1)}, T0)
                       for i in range(5)]
            d = Delivery(sink, m, max_batches=4, overflow="block", retry=RetryPolicy())
            d.start()
            d.submit(Batch(seq=1, entries=entries, times=[T0] * 5, nbytes=1))
            assert d.close(10) is True
        finally:
            rx.close()
        assert rx.acked == entries[:2] + entries[3:]
        assert m.value("shipper_records_shipped_total", "syslog") == 4
        assert m.value("shipper_records_dropped_total", "too_large") == 1

    def test_a_batch_of_only_oversized_records_needs_no_connection(self) -> None:
        """Nothing to send: no connection is attempted, the records are reported."""
        sink = _sink(addresses=["127.0.0.1:1"], max_message_bytes=480)
        big = sink.encode({**RECORD, "pad": "x" * 600}, T0)
        assert sink.deliver(Batch(seq=1, entries=[big], times=[T0], nbytes=1)) == {
            "too_large": 1}
