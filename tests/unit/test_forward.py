"""forward sink: wire format (pure) and the connection/handshake/ack behaviour against the fake."""

from __future__ import annotations

import contextlib
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
from shipper.sinks.forward import ForwardSink
from shipper.sinks.net import parse_address
from tests.fakes.forward_receiver import PROFILES, ForwardReceiver

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
        """The record serialiser (ormsgpack) produces msgpack's exact bytes."""
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
        """An ack that comes late but within ack_timeout_s confirms the batch: the receiver
        has the records once, and they are counted acked with no error and no retry."""
        m = Metrics()
        rx.mode, rx.ack_delay_s = "ack_late", 0.2
        sink = _sink([rx.address], m, ack_timeout_s=5)
        sink.deliver(_batch(sink, _records(2)))
        assert [r.record for r in rx.records()] == _records(2)
        assert rx.stats.acks == 1 and rx.stats.connections == 1
        assert m.value("shipper_forward_records_acked_total", rx.address) == 2
        assert m.total("shipper_forward_errors_total") == 0
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


KEY = b"s3cret"
USERS = {"shipper": b"pa55word"}
# What each settings hint must name (docs/FORWARD.md, "Receiver compatibility").
KEY_SETTING = "sink.forward.shared_key_file"
USER_SETTINGS = ("sink.forward.username", "sink.forward.password_file")


def _secret_file(tmp_path: Path, name: str, value: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(value + b"\n")  # a trailing newline (hand-written file) is ignored
    return p


def _hs_sink(tmp_path: Path, rx: ForwardReceiver, m: Metrics | None = None, *,
             key: bytes = KEY, user: tuple[str, bytes] | None = None) -> ForwardSink:
    kw: dict[str, Any] = {"shared_key_file": _secret_file(tmp_path, "shared_key", key)}
    if user is not None:
        kw["username"] = user[0]
        kw["password_file"] = _secret_file(tmp_path, "password", user[1])
    return _sink([rx.address], m, **kw)


def _refused(sink: ForwardSink, rx: ForwardReceiver, m: Metrics) -> str:
    """Deliver one batch that must be refused at the handshake; return the error text after
    checking what every refusal shares: retriable, counted as auth, nothing ingested."""
    with pytest.raises(SinkError) as ei:
        sink.deliver(_batch(sink, _records(2)))
    sink.close()
    assert ei.value.retriable  # a Secret rotation may fix it: the batch waits (forward.py)
    assert m.value("shipper_forward_errors_total", rx.address, "auth") == 1
    assert rx.records() == [] and rx.stats.messages == 0
    assert rx.stats.handshakes_failed == 1 and rx.stats.handshakes_ok == 0
    return str(ei.value)


@pytest.mark.parametrize("profile", PROFILES)
class TestHandshake:
    """The shared_key handshake against both receiver profiles (the compatibility table in
    docs/FORWARD.md names these tests)."""

    def test_plain(self, profile: str) -> None:
        """Without shared_key on either side there is no handshake: no HELO, records arrive."""
        with ForwardReceiver(profile=profile) as rx:
            sink = _sink([rx.address])
            sink.deliver(_batch(sink, _records(3)))
            sink.close()
            assert [r.record for r in rx.records()] == _records(3)
            assert rx.stats.helos == [] and rx.stats.acks == 1

    def test_shared_key_only(self, tmp_path: Path, profile: str) -> None:
        """shared_key without users: the HELO's auth salt (sent by both peers) is answered
        like Fluentd's out_forward does - empty username, digest of an empty username and
        password - and the receiver gets the records."""
        with ForwardReceiver(profile=profile, shared_key=KEY) as rx:
            sink = _hs_sink(tmp_path, rx)
            sink.deliver(_batch(sink, _records(3)))
            sink.close()
            assert [r.record for r in rx.records()] == _records(3)
            (_, auth), = rx.stats.helos
            assert len(auth) == 16
            (ping,) = rx.stats.pings
            assert ping[4] == "" and ping[5] == ff.sha512_hex(auth)

    def test_shared_key_with_users(self, tmp_path: Path, profile: str) -> None:
        """shared_key plus users: the configured user and password pass and records arrive."""
        with ForwardReceiver(profile=profile, shared_key=KEY, users=USERS) as rx:
            sink = _hs_sink(tmp_path, rx, user=("shipper", b"pa55word"))
            sink.deliver(_batch(sink, _records(3)))
            sink.close()
            assert [r.record for r in rx.records()] == _records(3)
            assert rx.stats.handshakes_ok == 1

    def test_credentials_the_receiver_does_not_need(self, tmp_path: Path, profile: str) -> None:
        """A user configured on our side is ignored by a receiver without users."""
        with ForwardReceiver(profile=profile, shared_key=KEY) as rx:
            sink = _hs_sink(tmp_path, rx, user=("shipper", b"pa55word"))
            sink.deliver(_batch(sink, _records(1)))
            sink.close()
            assert len(rx.records()) == 1

    def test_wrong_key(self, tmp_path: Path, profile: str,
                       caplog: pytest.LogCaptureFixture) -> None:
        """A wrong shared_key (Fluent Bit: EOF instead of PONG; Fluentd: PONG false
        "shared_key mismatch") is an auth error that says what happened and names the key
        setting and the two user settings; the key never appears in logs or errors."""
        m = Metrics()
        with ForwardReceiver(profile=profile, shared_key=KEY) as rx:
            text = _refused(_hs_sink(tmp_path, rx, m, key=b"wrong-key-xyz"), rx, m)
        if profile == "fluent-bit-5":
            assert "closed the connection instead of answering PING" in text
        else:
            assert "rejected the handshake: 'shared_key mismatch'" in text
        assert KEY_SETTING in text
        assert "may also require users" in text and all(s in text for s in USER_SETTINGS)
        assert "wrong-key-xyz" not in caplog.text + text
        assert "forward authentication failed" in caplog.text

    def test_wrong_password(self, tmp_path: Path, profile: str,
                            caplog: pytest.LogCaptureFixture) -> None:
        """A wrong password is refused by both peers with PONG false "username/password
        mismatch"; the error names the user settings and never the password."""
        m = Metrics()
        with ForwardReceiver(profile=profile, shared_key=KEY, users=USERS) as rx:
            text = _refused(_hs_sink(tmp_path, rx, m, user=("shipper", b"not-it-123")), rx, m)
        assert "rejected the handshake: 'username/password mismatch'" in text
        assert all(s in text for s in USER_SETTINGS)
        assert "not-it-123" not in caplog.text + text

    def test_unknown_user(self, tmp_path: Path, profile: str) -> None:
        """A user the receiver does not know is refused like a wrong password."""
        m = Metrics()
        with ForwardReceiver(profile=profile, shared_key=KEY, users=USERS) as rx:
            text = _refused(_hs_sink(tmp_path, rx, m, user=("nobody", b"pa55word")), rx, m)
        assert "'username/password mismatch'" in text

    def test_users_required_but_not_configured(self, tmp_path: Path, profile: str) -> None:
        """A receiver with users refuses a sender without them; the error says the receiver
        requires users and names sink.forward.username and sink.forward.password_file."""
        m = Metrics()
        with ForwardReceiver(profile=profile, shared_key=KEY, users=USERS) as rx:
            text = _refused(_hs_sink(tmp_path, rx, m), rx, m)
        assert "'username/password mismatch'" in text
        assert "receiver requires users" in text and all(s in text for s in USER_SETTINGS)

    def test_wrong_key_with_users(self, tmp_path: Path, profile: str) -> None:
        """With users on the receiver the key is still checked first: a wrong key is reported
        as such (Fluent Bit: EOF; Fluentd: "shared_key mismatch")."""
        m = Metrics()
        with ForwardReceiver(profile=profile, shared_key=KEY, users=USERS) as rx:
            text = _refused(_hs_sink(tmp_path, rx, m, key=b"other",
                                     user=("shipper", b"pa55word")), rx, m)
        assert KEY_SETTING in text
        if profile == "fluent-bit-5":
            assert "closed the connection instead of answering PING" in text
        else:
            assert "'shared_key mismatch'" in text

    def test_receiver_requires_key_we_lack(self, profile: str) -> None:
        """A receiver that starts with HELO while we have no shared_key: a clear error naming
        sink.forward.shared_key_file, and nothing ingested."""
        m = Metrics()
        with ForwardReceiver(profile=profile, shared_key=KEY) as rx:
            sink = _sink([rx.address], m)
            with pytest.raises(SinkError, match="shared_key_file is not set"):
                sink.deliver(_batch(sink, _records(1)))
            sink.close()
            assert rx.records() == []
            assert m.value("shipper_forward_errors_total", rx.address, "auth") == 1

    def test_key_rotation_is_picked_up(self, tmp_path: Path, profile: str) -> None:
        """The key file is re-read per connection: fixing it makes the next attempt succeed."""
        with ForwardReceiver(profile=profile, shared_key=b"new") as rx:
            sink = _hs_sink(tmp_path, rx, key=b"old")
            with pytest.raises(SinkError):
                sink.deliver(_batch(sink, _records(1)))
            assert rx.records() == []
            _secret_file(tmp_path, "shared_key", b"new")
            sink.deliver(_batch(sink, _records(1)))
            sink.close()
            assert len(rx.records()) == 1

    def test_server_with_wrong_key_is_refused(self, tmp_path: Path, profile: str) -> None:
        """A server whose PONG digest does not prove the key is refused: no data is sent."""
        with ForwardReceiver(profile=profile, shared_key=KEY, wrong_pong_digest=True) as rx:
            sink = _hs_sink(tmp_path, rx)
            with pytest.raises(SinkError, match="PONG digest mismatch"):
                sink.deliver(_batch(sink, _records(1)))
            sink.close()
            assert rx.records() == [] and rx.stats.messages == 0


class TestHandshakeConfig:
    def test_unreadable_key_file_fails_at_start(self, tmp_path: Path) -> None:
        """A missing key file is reported when the sink is built."""
        with pytest.raises(SinkError, match="cannot read shared_key file"):
            _sink(["127.0.0.1:1"], shared_key_file=tmp_path / "missing")


def _raw_handshake(rx: ForwardReceiver, ping_and_more: Any, expect: int) -> list[bytes]:
    """Connect to ``rx``, read the HELO, send ``ping_and_more(nonce, auth)`` in one write;
    return the bytes of each reply: ``expect`` msgpack objects, or fewer if the receiver
    closes first (each read bounded by a 5 s socket timeout); nothing may follow them."""
    with socket.create_connection(("127.0.0.1", rx.port), timeout=5) as s:
        helo = msgpack.unpackb(s.recv(4096), raw=True)
        s.sendall(ping_and_more(helo[1][b"nonce"], helo[1][b"auth"]))
        u = msgpack.Unpacker(raw=True)
        buf = b""
        replies: list[bytes] = []
        while len(replies) < expect and (chunk := s.recv(65536)):
            buf += chunk
            u.feed(chunk)
            for _ in u:
                replies.append(buf[: u.tell()])
                buf = buf[u.tell():]
                u = msgpack.Unpacker(raw=True)
                u.feed(buf)
        s.settimeout(0.3)
        with contextlib.suppress(TimeoutError):
            assert s.recv(65536) == b"", "unexpected bytes after the replies"
        return replies


class TestReceiverProfiles:
    """The fake's handshake bytes are the real peers' (read from their source; see the
    docstring of tests/fakes/forward_receiver.py)."""

    def test_fluent_bit_helo_bytes(self) -> None:
        """fluent-bit-5 HELO: fixmap of 2, nonce and auth as 16-byte msgpack *str*, no
        keepalive (fw_prot.c send_helo)."""
        rx = ForwardReceiver(profile="fluent-bit-5", shared_key=KEY)
        nonce, auth = bytes(range(240, 256)), bytes(range(16))
        assert rx.helo(nonce, auth) == (b"\x92\xa4HELO\x82\xa5nonce\xb0" + nonce
                                        + b"\xa4auth\xb0" + auth)

    def test_fluentd_helo_bytes(self) -> None:
        """fluentd-1 HELO: nonce and auth as bin 8 of 16 bytes (ASCII-8BIT strings in
        msgpack-ruby), then keepalive true (in_forward.rb generate_helo)."""
        rx = ForwardReceiver(profile="fluentd-1", shared_key=KEY)
        nonce, auth = bytes(range(240, 256)), bytes(range(16))
        assert rx.helo(nonce, auth) == (b"\x92\xa4HELO\x83\xa5nonce\xc4\x10" + nonce
                                        + b"\xa4auth\xc4\x10" + auth
                                        + b"\xa9keepalive\xc3")

    @pytest.mark.parametrize(("profile", "ingested"), [("fluent-bit-5", 0), ("fluentd-1", 1)])
    def test_data_in_the_ping_write(self, profile: str, ingested: int) -> None:
        """Data written together with the PING is dropped by Fluent Bit (one read, the rest
        ignored) and handled (acked) by Fluentd (a stream); both answer the PING."""
        entry = ff.encode_entry({"a": 1}, T0)
        data = ff.build_message("forward", ff.pack_str("t"), [entry], "C1")
        with ForwardReceiver(profile=profile, shared_key=KEY) as rx:
            replies = _raw_handshake(rx, lambda nonce, auth: ff.build_ping(
                "h", "salt", nonce, KEY, "", b"", auth) + data, expect=1 + ingested)
            assert msgpack.unpackb(replies[0])[:2] == ["PONG", True]
            assert [msgpack.unpackb(r) for r in replies[1:]] == [{"ack": "C1"}] * ingested
            assert len(rx.records()) == ingested

    @pytest.mark.parametrize(("profile", "replies"), [
        ("fluent-bit-5", []),
        ("fluentd-1", [msgpack.packb(["PONG", False, "shared_key mismatch", "", ""])]),
    ])
    def test_wrong_key_reply(self, profile: str, replies: list[bytes]) -> None:
        """On a wrong key Fluent Bit closes without a PONG; Fluentd sends PONG false with the
        reason, then closes."""
        with ForwardReceiver(profile=profile, shared_key=KEY) as rx:
            got = _raw_handshake(rx, lambda nonce, auth: ff.build_ping(
                "h", "salt", nonce, b"bad", "", b"", auth), expect=1)
        assert got == replies

    @pytest.mark.parametrize("profile", PROFILES)
    def test_wrong_user_reply(self, profile: str) -> None:
        """On a wrong password both peers send PONG false "username/password mismatch",
        then close."""
        with ForwardReceiver(profile=profile, shared_key=KEY, users=USERS) as rx:
            got = _raw_handshake(rx, lambda nonce, auth: ff.build_ping(
                "h", "salt", nonce, KEY, "shipper", b"bad", auth), expect=2)
        assert got == [msgpack.packb(["PONG", False, "username/password mismatch", "", ""])]

    @pytest.mark.parametrize("profile", PROFILES)
    def test_partial_ping(self, profile: str) -> None:
        """A PING split across two writes: Fluent Bit gives up after the first read (closes,
        no PONG); Fluentd waits for the rest and answers."""
        with ForwardReceiver(profile=profile, shared_key=KEY) as rx, \
                socket.create_connection(("127.0.0.1", rx.port), timeout=5) as s:
            helo = msgpack.unpackb(s.recv(4096), raw=True)
            ping = ff.build_ping("h", "salt", helo[1][b"nonce"], KEY, "", b"", helo[1][b"auth"])
            s.sendall(ping[:10])
            if profile == "fluent-bit-5":
                assert s.recv(4096) == b""
            else:
                s.settimeout(0.2)
                with pytest.raises(TimeoutError):
                    s.recv(4096)  # still waiting for the rest of the PING
                s.settimeout(5)
                s.sendall(ping[10:])
                assert msgpack.unpackb(s.recv(4096))[:2] == ["PONG", True]

    @pytest.mark.parametrize(("profile", "host"), [("fluent-bit-5", "localhost"),
                                                   ("fluentd-1", "fake-fluentd")])
    def test_pong_bytes(self, profile: str, host: str) -> None:
        """A passed PING gets ["PONG", true, "", self_hostname, sha512_hex(salt + self_hostname
        + nonce + key)], all str (Fluent Bit's self_hostname defaults to localhost)."""
        nonces: list[bytes] = []

        def ping(nonce: bytes, auth: bytes) -> bytes:
            nonces.append(nonce)
            return ff.build_ping("h", "salt", nonce, KEY, "", b"", auth)

        with ForwardReceiver(profile=profile, shared_key=KEY) as rx:
            got = _raw_handshake(rx, ping, expect=1)
        assert got == [msgpack.packb(["PONG", True, "", host,
                                      ff.sha512_hex(b"salt", host.encode(), nonces[0], KEY)])]

    def test_users_need_a_shared_key(self) -> None:
        """Like both peers, the fake refuses users without a shared_key."""
        with pytest.raises(ValueError, match="shared_key"):
            ForwardReceiver(users=USERS)


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


class TestCompatibilityTable:
    def test_every_row_is_backed_by_tests_on_both_profiles(self) -> None:
        """Each supported row of docs/FORWARD.md's receiver compatibility table names tests
        that exist and are parametrized over both receiver profiles."""
        import re

        from tests.integration import test_forward_delivery as integ

        doc = (Path(__file__).resolve().parents[2] / "docs" / "FORWARD.md").read_text()
        table = doc.split("## Receiver compatibility", 1)[1].split("\n\n")[2]
        rows = [r for r in table.splitlines()[2:] if r.startswith("|")]
        assert len(rows) >= 7
        for row in rows:
            cells = [c.strip() for c in row.strip("|").split("|")]
            names = re.findall(r"`((?:TestTLS::)?test_\w+)`", cells[-1])
            if "not supported" in row:
                assert names == []
                continue
            assert names, f"row without tests: {cells[0]}"
            for name in names:
                if name.startswith("TestTLS::"):
                    owner: Any = integ.TestTLS
                    name = name.split("::")[1]
                else:
                    owner = TestHandshake
                fn = getattr(owner, name)
                marks = [*getattr(owner, "pytestmark", []), *getattr(fn, "pytestmark", [])]
                assert any(m.name == "parametrize" and m.args[0] == "profile"
                           and tuple(m.args[1]) == PROFILES for m in marks), name
