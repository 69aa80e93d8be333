"""forward sink: wire format (pure) and the connection/handshake/ack behaviour against the fake."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import orjson
import pytest
from fluent.sender import EventTime, FluentSender

from shipper.config import ForwardSinkConfig
from shipper.errors import SinkError
from shipper.metrics import Metrics
from shipper.sinks import forward_format as ff
from shipper.sinks.base import Batch
from shipper.sinks.forward import ForwardSink, parse_address
from tests.fakes.forward_receiver import ForwardReceiver

T0 = 1_700_000_000_123_456_789

RECORD: dict[str, Any] = {
    "@timestamp": "2023-11-14T22:13:20.123456789Z",
    "event": {"id": "0123456789abcdef", "action": "destroy", "category": ["network"],
              "duration": 1_000_000_000},
    "source": {"ip": "10.16.0.5", "port": 43210, "bytes": 1234, "nat": {"ip": "192.0.2.1"}},
    "destination": {"ip": "1.1.1.1", "port": 443, "bytes": 5678},
    "network": {"transport": "tcp", "iana_number": 6},
    "kubernetes": {"namespace": "default", "pod": {"name": "web-1", "labels": {"app": "web"}}},
    "labels": {"ünïcode": "välue", "empty": ""},
    "flags": {"t": True, "f": False, "none": None, "float": 1.5, "neg": -7, "big": 2**63},
}


def _records(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"event": {"id": f"{i:08d}"}, "seq": i} for i in range(start, start + n)]


def _batch(sink: ForwardSink, recs: list[dict[str, Any]], seq: int = 1) -> Batch:
    entries = [sink.encode(r, T0 + i) for i, r in enumerate(recs)]
    return Batch(seq=seq, entries=entries, times=[T0 + i for i in range(len(recs))],
                 nbytes=sum(map(len, entries)), opened_mono=time.monotonic())


def _sink(addresses: list[str], metrics: Metrics | None = None, **kw: Any) -> ForwardSink:
    kw.setdefault("ack_timeout_s", 2.0)
    kw.setdefault("connect_timeout_s", 2.0)
    return ForwardSink(ForwardSinkConfig(addresses=addresses, **kw), metrics or Metrics())


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return int(port)


@pytest.fixture
def rx() -> Any:
    r = ForwardReceiver().start()
    yield r
    r.close()


class TestEncode:
    def test_entry_is_eventtime_and_record(self) -> None:
        """An entry is msgpack [EventTime(ns), record], byte-identical to fluent-logger's
        EventTime packed by msgpack."""
        expected = msgpack.packb([EventTime.from_unix_nano(T0), RECORD])
        assert ff.encode_entry(RECORD, T0) == expected

    def test_nanoseconds_survive(self) -> None:
        """The nanosecond part of the time is kept exactly."""
        (t, rec), = ff.decode_entries(ff.encode_entry({"a": 1}, T0))
        assert t == T0 and rec == {"a": 1}

    def test_fast_packer_matches_msgpack(self) -> None:
        """The record serialiser (ormsgpack when installed) produces msgpack's exact bytes."""
        for rec in (RECORD, {}, {"a": [1, 2, {"b": None}]}, {"s": "x" * 70000}):
            assert ff._pack_record(rec) == msgpack.packb(rec)

    def test_unknown_types_fall_back(self) -> None:
        """Types msgpack does not know are encoded through the fallback, not rejected."""
        frag = orjson.Fragment(b'{"pre":["serialised",1]}')
        (_, rec), = ff.decode_entries(
            ff.encode_entry({"t": (1, 2), "p": Path("/x"), "f": frag}, T0))
        assert rec == {"t": [1, 2], "p": "/x", "f": {"pre": ["serialised", 1]}}


class TestBuildMessage:
    @pytest.mark.parametrize("mode", ["forward", "packed_forward", "compressed_packed_forward"])
    def test_batch_modes_round_trip(self, mode: str) -> None:
        """Forward, PackedForward and CompressedPackedForward carry all entries, size and chunk."""
        recs = _records(300)
        entries = [ff.encode_entry(r, T0 + i) for i, r in enumerate(recs)]
        data = ff.build_message(mode, ff.pack_str("flow.tag"), entries, "CHUNK")
        msgs = list(_unpack(data))
        assert len(msgs) == 1
        tag, got, opts = ff.decode_message(msgs[0])
        assert tag == "flow.tag"
        assert [r for _, r in got] == recs
        assert [t for t, _ in got] == [T0 + i for i in range(300)]
        assert opts["size"] == 300 and opts["chunk"] == "CHUNK"
        assert (opts.get("compressed") == "gzip") == (mode == "compressed_packed_forward")

    def test_no_chunk_without_ack(self) -> None:
        """Without a chunk id (acks off) the option map has no chunk."""
        data = ff.build_message("packed_forward", ff.pack_str("t"), [ff.encode_entry({}, T0)], None)
        _, _, opts = ff.decode_message(next(iter(_unpack(data))))
        assert "chunk" not in opts

    def test_message_mode_matches_fluent_logger(self) -> None:
        """Message mode is one [tag, time, record] per record, byte-identical to fluent-logger's
        sender with nanosecond EventTime; only the last message carries the chunk."""
        recs = _records(3)
        entries = [ff.encode_entry(r, T0 + i) for i, r in enumerate(recs)]
        data = ff.build_message("message", ff.pack_str("tag"), entries, "C1")
        sender = FluentSender("tag", nanosecond_precision=True)
        expected = b"".join(sender._make_packet(None, EventTime.from_unix_nano(T0 + i), r)
                            for i, r in enumerate(recs[:2]))
        assert data.startswith(expected)
        msgs = list(_unpack(data))
        assert len(msgs) == 3
        assert [ff.decode_message(m)[2] for m in msgs] == [{}, {}, {"chunk": "C1"}]

    def test_unknown_mode(self) -> None:
        """An unknown mode is a programming error."""
        with pytest.raises(ValueError):
            ff.build_message("bogus", ff.pack_str("t"), [], None)

    def test_chunk_ids_are_unique(self) -> None:
        """Chunk ids are random base64 of 16 bytes."""
        ids = {ff.new_chunk_id() for _ in range(1000)}
        assert len(ids) == 1000 and all(len(i) == 24 for i in ids)


class TestHandshakeFormat:
    def test_ping_shape_and_digest(self) -> None:
        """PING is six str elements; digest = sha512_hex(salt + hostname + nonce + key)."""
        nonce = bytes(range(240, 256))  # not UTF-8, like Fluent Bit's
        raw = ff.build_ping("node-1", "salt", nonce, b"secret")
        ping = msgpack.unpackb(raw, raw=True)
        assert len(ping) == 6 and raw[1:2] == b"\xa4"  # fixstr "PING"
        assert ping[:3] == [b"PING", b"node-1", b"salt"]
        assert ping[3].decode() == ff.sha512_hex(b"salt", b"node-1", nonce, b"secret")
        assert ping[4:] == [b"", b""]

    def test_ping_with_user(self) -> None:
        """With user auth requested, username and sha512_hex(auth + user + password) are sent."""
        ping = msgpack.unpackb(ff.build_ping("h", "s", b"n", b"k", "bob", b"pw", b"AUTH"), raw=True)
        assert ping[4] == b"bob"
        assert ping[5].decode() == ff.sha512_hex(b"AUTH", b"bob", b"pw")

    def test_pong_digest(self) -> None:
        """The server's digest uses its own hostname."""
        assert ff.pong_digest("s", b"srv", b"n", b"k") == ff.sha512_hex(b"s", b"srv", b"n", b"k")


class TestParseAddress:
    def test_forms(self) -> None:
        """HOST:PORT and [v6]:PORT parse; garbage raises."""
        assert parse_address("fluentd.logging:24224") == ("fluentd.logging", 24224)
        assert parse_address("[::1]:24224") == ("::1", 24224)
        for bad in ("nohost", ":24224", "h:0", "h:99999", "h:x"):
            with pytest.raises(ValueError):
                parse_address(bad)


class TestDeliver:
    def test_acked_batch_arrives(self, rx: ForwardReceiver) -> None:
        """A batch arrives whole, in order, with tag and ns times; metrics count it acked."""
        m = Metrics()
        sink = _sink([rx.address], m, tag="flows")
        recs = _records(50)
        sink.deliver(_batch(sink, recs))
        got = rx.records()
        assert [r.record for r in got] == recs
        assert {r.tag for r in got} == {"flows"}
        assert got[7].time_ns == T0 + 7
        assert m.value("shipper_forward_batches_acked_total", rx.address) == 1
        assert m.value("shipper_forward_records_acked_total", rx.address) == 50
        assert m.value("shipper_forward_connected", rx.address) == 1
        assert m.histogram_count("shipper_forward_ack_latency_seconds", rx.address) == 1
        sink.close()
        assert m.value("shipper_forward_connected", rx.address) == 0

    @pytest.mark.parametrize("mode", ["forward", "compressed_packed_forward", "message"])
    def test_every_mode_is_acked(self, rx: ForwardReceiver, mode: str) -> None:
        """Every mode gets its ack and delivers every record."""
        sink = _sink([rx.address], mode=mode)
        sink.deliver(_batch(sink, _records(20)))
        assert [r.record for r in rx.records()] == _records(20)
        assert rx.stats.acks == 1
        sink.close()

    def test_connection_is_reused(self, rx: ForwardReceiver) -> None:
        """Consecutive batches share one connection."""
        sink = _sink([rx.address])
        for i in range(5):
            sink.deliver(_batch(sink, _records(3, 3 * i), seq=i))
        assert rx.stats.connections == 1 and len(rx.records()) == 15
        sink.close()

    def test_reconnects_after_idle_close(self, rx: ForwardReceiver) -> None:
        """A connection the receiver closed while idle is replaced without a failed attempt."""
        m = Metrics()
        sink = _sink([rx.address], m)
        sink.deliver(_batch(sink, _records(1)))
        rx.stop()
        rx.start()
        sink.deliver(_batch(sink, _records(1, 1)))
        assert m.total("shipper_forward_errors_total") == 0
        assert len(rx.records()) == 2
        sink.close()

    def test_ack_off_does_not_wait(self, rx: ForwardReceiver) -> None:
        """With acks off no chunk is sent and deliver returns after the write."""
        rx.mode = "never_ack"
        sink = _sink([rx.address], ack=False)
        sink.deliver(_batch(sink, _records(5)))
        rx.wait_records(5)
        assert rx.stats.chunks == []
        sink.close()

    @pytest.mark.parametrize(
        ("mode", "kind", "text"),
        [
            ("never_ack", "ack_timeout", "no ack within"),
            ("drop_mid_batch", "closed", "closed the connection"),
            ("drop_after_ingest", "closed", "closed the connection"),
            ("garbage", "protocol", "not msgpack"),
            ("wrong_ack", "ack_mismatch", "ack for another chunk"),
        ],
    )
    def test_failures_are_retriable(self, rx: ForwardReceiver, mode: str, kind: str,
                                    text: str) -> None:
        """Missing, late, mismatched or garbled acks and dropped connections raise a retriable
        SinkError, count the error kind, and the next attempt succeeds on a fresh connection."""
        m = Metrics()
        sink = _sink([rx.address], m, ack_timeout_s=0.3)
        rx.fail_next(1, mode)
        with pytest.raises(SinkError) as ei:
            sink.deliver(_batch(sink, _records(4)))
        assert ei.value.retriable and text in str(ei.value)
        assert m.value("shipper_forward_errors_total", rx.address, kind) == 1
        sink.deliver(_batch(sink, _records(4)))
        assert rx.stats.connections == 2
        sink.close()

    def test_late_ack_within_timeout(self, rx: ForwardReceiver) -> None:
        """An ack that comes late but within ack_timeout_s is accepted."""
        rx.mode, rx.ack_delay_s = "ack_late", 0.2
        sink = _sink([rx.address], ack_timeout_s=5)
        sink.deliver(_batch(sink, _records(2)))
        sink.close()

    def test_ack_late_beyond_timeout(self, rx: ForwardReceiver) -> None:
        """An ack later than ack_timeout_s is a retriable timeout."""
        rx.mode, rx.ack_delay_s = "ack_late", 1.0
        sink = _sink([rx.address], ack_timeout_s=0.2)
        with pytest.raises(SinkError, match="no ack within"):
            sink.deliver(_batch(sink, _records(2)))
        sink.close()

    def test_failover_to_next_address(self, rx: ForwardReceiver) -> None:
        """A dead first address fails over to the next; the dead one is counted."""
        m = Metrics()
        dead = f"127.0.0.1:{_closed_port()}"
        sink = _sink([dead, rx.address], m)
        sink.deliver(_batch(sink, _records(3)))
        assert len(rx.records()) == 3
        assert m.value("shipper_forward_errors_total", dead, "connect") == 1
        assert m.value("shipper_forward_connections_total", rx.address) == 1
        sink.close()

    def test_failed_endpoint_is_tried_last(self) -> None:
        """After an endpoint fails, the next connection prefers the other one (cooldown)."""
        a, b = ForwardReceiver().start(), ForwardReceiver().start()
        try:
            sink = _sink([a.address, b.address], ack_timeout_s=0.3)
            a.fail_next(1, "never_ack")
            with pytest.raises(SinkError):
                sink.deliver(_batch(sink, _records(1)))
            sink.deliver(_batch(sink, _records(1)))
            assert b.stats.acks == 1
            sink.close()
        finally:
            a.close()
            b.close()

    def test_all_down(self) -> None:
        """When no receiver is reachable the error names every address."""
        dead1, dead2 = f"127.0.0.1:{_closed_port()}", f"127.0.0.1:{_closed_port()}"
        sink = _sink([dead1, dead2])
        with pytest.raises(SinkError) as ei:
            sink.deliver(_batch(sink, _records(1)))
        assert ei.value.retriable and dead1 in str(ei.value) and dead2 in str(ei.value)

    def test_receiver_requires_key_we_lack(self) -> None:
        """A receiver that starts with HELO while we have no key gives a clear error."""
        with ForwardReceiver(shared_key=b"k") as r:
            sink = _sink([r.address])
            with pytest.raises(SinkError, match="shared_key_file is not set"):
                sink.deliver(_batch(sink, _records(1)))
            sink.close()

    def test_abort_interrupts_a_blocked_deliver(self, rx: ForwardReceiver) -> None:
        """abort() from another thread ends a deliver waiting for an ack."""
        rx.mode = "never_ack"
        sink = _sink([rx.address], ack_timeout_s=30)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                sink.deliver(_batch(sink, _records(1)))
            except SinkError as exc:
                errors.append(exc)

        t = threading.Thread(target=run)
        t.start()
        rx.wait_records(1)
        t0 = time.monotonic()
        sink.abort()
        t.join(5)
        assert not t.is_alive() and errors and time.monotonic() - t0 < 5
        sink.close()


class TestSharedKey:
    def _key(self, tmp_path: Path, key: bytes) -> Path:
        p = tmp_path / "shared_key"
        p.write_bytes(key + b"\n")  # a trailing newline (hand-written file) is ignored
        return p

    def test_right_key(self, tmp_path: Path) -> None:
        """With the right key the handshake passes and records are delivered."""
        with ForwardReceiver(shared_key=b"s3cret") as r:
            sink = _sink([r.address], shared_key_file=self._key(tmp_path, b"s3cret"))
            sink.deliver(_batch(sink, _records(3)))
            assert len(r.records()) == 3 and r.stats.handshakes_ok == 1
            sink.close()

    @pytest.mark.parametrize("style", ["pong", "close"])
    def test_wrong_key_is_a_clear_error(self, tmp_path: Path, style: str,
                                        caplog: pytest.LogCaptureFixture) -> None:
        """A wrong key is refused (Fluentd's PONG false or Fluent Bit's EOF) with a message
        naming the shared_key, counted as auth; the key itself is never logged."""
        m = Metrics()
        with ForwardReceiver(shared_key=b"right", auth_failure=style) as r:
            sink = _sink([r.address], m, shared_key_file=self._key(tmp_path, b"wrong-key-xyz"))
            with pytest.raises(SinkError) as ei:
                sink.deliver(_batch(sink, _records(1)))
            assert ei.value.retriable  # a Secret rotation may fix it; see forward.py
            assert "shared_key" in str(ei.value)
            assert m.value("shipper_forward_errors_total", r.address, "auth") == 1
            assert r.records() == []
            assert "wrong-key-xyz" not in caplog.text + str(ei.value)
            sink.close()

    def test_key_rotation_is_picked_up(self, tmp_path: Path) -> None:
        """The key file is re-read per connection: fixing it makes the next attempt succeed."""
        keyfile = self._key(tmp_path, b"old")
        with ForwardReceiver(shared_key=b"new") as r:
            sink = _sink([r.address], shared_key_file=keyfile)
            with pytest.raises(SinkError):
                sink.deliver(_batch(sink, _records(1)))
            keyfile.write_bytes(b"new")
            sink.deliver(_batch(sink, _records(1)))
            assert len(r.records()) == 1
            sink.close()

    def test_server_with_wrong_key_is_refused(self, tmp_path: Path) -> None:
        """A server whose PONG digest does not prove the key is refused."""
        with ForwardReceiver(shared_key=b"k", wrong_pong_digest=True) as r:
            sink = _sink([r.address], shared_key_file=self._key(tmp_path, b"k"))
            with pytest.raises(SinkError, match="PONG digest mismatch"):
                sink.deliver(_batch(sink, _records(1)))
            assert r.records() == []
            sink.close()

    def test_unreadable_key_file_fails_at_start(self, tmp_path: Path) -> None:
        """A missing key file is reported when the sink is built."""
        with pytest.raises(SinkError, match="cannot read shared_key file"):
            _sink(["127.0.0.1:1"], shared_key_file=tmp_path / "missing")


class TestFluentLoggerInterop:
    def test_fluent_logger_sender_reaches_the_fake(self, rx: ForwardReceiver) -> None:
        """The fake receiver decodes what fluent-logger (an independent sender) sends."""
        sender = FluentSender("app", host="127.0.0.1", port=rx.port, nanosecond_precision=True)
        assert sender.emit_with_time("x", EventTime.from_unix_nano(T0), {"k": "v"})
        sender.close()
        (got,) = rx.wait_records(1)
        assert (got.tag, got.time_ns, got.record) == ("app.x", T0, {"k": "v"})


def _unpack(data: bytes) -> Any:
    u = ff.unpacker()
    u.feed(data)
    return u
