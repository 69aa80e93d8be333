"""The syslog sink against a real rsyslog (Debian's rsyslogd + imtcp/imrelp, gtls/ossl).

Each test starts its own rsyslogd on 127.0.0.1 (``tests/integration/rsyslog.py``),
ships real records (built by ``ecs.build_record`` / ``ecs.gap_record``) and parses
rsyslog's output file back. TLS material comes from the ``pki`` fixture (openssl CLI).
Waits are bounded polls.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from shipper import ecs
from shipper.config import FACILITIES, SyslogSinkConfig, SyslogTLSConfig
from shipper.delivery import Delivery
from shipper.errors import SinkError
from shipper.metrics import Metrics
from shipper.record import ATTR_RESOLVED, ATTR_UNRESOLVED
from shipper.sinks.base import Batch
from shipper.sinks.retry import RetryPolicy
from shipper.sinks.spool import Spool
from shipper.sinks.syslog import SyslogSink, _tcp_info
from tests.integration.rsyslog import Rsyslog, require_rsyslog
from tests.integration.spool_child import child_stderr, kill, read_line, start_child
from tests.unit.test_ecs import make_event, make_pod

REPO = Path(__file__).resolve().parents[2]
T0 = 1_764_660_000_000_000_000
FAST = RetryPolicy(initial_s=0.02, max_s=0.2)
HOST = "node-1"


def _records(n: int, first: int = 0) -> list[dict[str, Any]]:
    """Real records: resolved and unresolved flows (labels with quotes and non-ASCII), and
    every 50th a gap record."""
    pod = make_pod(labels={"app": "web", "note": 'quote " back\\slash ünïcode ✓'})
    out = []
    for i in range(first, first + n):
        t = T0 + i * 1_000_000
        if i % 50 == 49:
            out.append(ecs.gap_record(HOST, since_ns=t - 5_000_000, until_ns=t, lost=i,
                                      overruns=1, resync=True))
            continue
        ev = make_event(ct_id=i + 1, orig_sport=1024 + i % 60000, reply_dport=2000 + i % 60000,
                        received_ns=t)
        resolved = i % 3 != 0
        out.append(ecs.build_record(ev, pod if resolved else None, HOST,
                                    attribution=ATTR_RESOLVED if resolved else ATTR_UNRESOLVED))
    return out


def _batches(sink: SyslogSink, records: list[dict[str, Any]], size: int) -> Iterator[Batch]:
    for seq, start in enumerate(range(0, len(records), size), 1):
        part = records[start:start + size]
        entries = [sink.encode(r, T0) for r in part]
        yield Batch(seq=seq, entries=entries, times=[T0] * len(entries),
                    nbytes=sum(map(len, entries)), opened_mono=time.monotonic())


def _sink(rs: Rsyslog | str, m: Metrics, **kw: Any) -> SyslogSink:
    address = rs.address if isinstance(rs, Rsyslog) else rs
    kw.setdefault("ack_timeout_s", 2.0)
    kw.setdefault("connect_timeout_s", 2.0)
    kw.setdefault("endpoint_cooldown_s", 0.0)
    return SyslogSink(SyslogSinkConfig(addresses=[address], **kw), m)


def _ids(lines: list[dict[str, Any]]) -> list[str]:
    return [orjson.loads(line["msg"])["event"]["id"] for line in lines]


def _first_seen(ids: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for i in ids:
        if i not in seen:
            seen.add(i)
            out.append(i)
    return out


def _wait(pred: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout}s")
        time.sleep(0.01)


def _assert_exact(lines: list[dict[str, Any]], records: list[dict[str, Any]],
                  sink: SyslogSink) -> None:
    """Every record arrived once, in order, exactly as shipped: the message bytes, the
    JSON in MSG and each RFC 5424 header field as rsyslog parsed it."""
    assert len(lines) == len(records)
    fac = FACILITIES[sink.cfg.facility]
    for line, rec in zip(lines, records, strict=True):
        wire = sink.encode(rec, T0).decode("utf-8")
        assert line["rawmsg"] == wire
        assert line["msg"] == orjson.dumps(rec).decode("utf-8")
        assert orjson.loads(line["msg"]) == rec
        sev = 4 if rec["event"]["action"] == "gap" else (
            5 if rec["flowlog"]["attribution"] == ATTR_UNRESOLVED else 6)
        assert line["pri"] == str(fac * 8 + sev)
        assert line["timestamp"] == rec["@timestamp"]
        assert line["hostname"] == HOST
        assert line["app"] == sink.cfg.app_name
        assert line["procid"] == str(os.getpid())
        assert line["msgid"] == rec["event"]["action"]
        assert line["sd"] == "-"


# --- every transport: exact arrival ---------------------------------------------------------


TRANSPORTS = [
    pytest.param("tcp", {}, id="tcp"),
    pytest.param("tls", {"driver": "gtls"}, id="tls-gtls"),
    pytest.param("tls", {"driver": "ossl"}, id="tls-ossl"),
    pytest.param("relp", {}, id="relp"),
    pytest.param("relp", {"relp_tls": True}, id="relp-tls"),
]


class TestEveryTransport:
    @pytest.mark.parametrize(("protocol", "rx"), TRANSPORTS)
    def test_every_record_arrives_exactly_as_shipped(self, protocol: str, rx: dict[str, Any],
                                                     tmp_path: Path, pki: Path) -> None:
        """300 real records (resolved, unresolved, gap) in batches of 25 arrive once, in order,
        byte for byte, with PRI/TIMESTAMP/HOSTNAME/APP-NAME/PROCID/MSGID as documented."""
        require_rsyslog("imrelp" if protocol == "relp" else "imtcp")
        tls = protocol == "tls" or rx.get("relp_tls", False)
        with Rsyslog(tmp_path, protocol, pki=pki if tls else None, **rx).start() as rs:
            m = Metrics()
            kw: dict[str, Any] = {"protocol": protocol, "app_name": "flowlog-test",
                                  "facility": "local3"}
            if tls:
                kw["tls"] = SyslogTLSConfig(ca_file=pki / "ca.crt")
            if rx.get("relp_tls"):
                # rsyslog's imrelp with certificates always demands a client certificate.
                kw["relp_tls"] = True
                kw["tls"] = SyslogTLSConfig(ca_file=pki / "ca.crt", cert_file=pki / "client.crt",
                                            key_file=pki / "client.key")
            sink = _sink(rs, m, **kw)
            records = _records(300)
            for b in _batches(sink, records, 25):
                sink.deliver(b)
            lines = rs.wait_lines(300)
            sink.close()
        _assert_exact(lines, records, sink)
        assert m.value("shipper_syslog_records_sent_total", rs.address) == 300
        if protocol == "relp":
            assert m.value("shipper_syslog_records_acked_total", rs.address) == 300
        assert m.value("shipper_syslog_records_lost_total", rs.address) == 0


# --- TLS verification -----------------------------------------------------------------------


class TestTLS:
    @pytest.mark.parametrize("protocol", ["tls", "relp"])
    def test_wrong_ca_is_refused(self, protocol: str, tmp_path: Path, pki: Path) -> None:
        """A receiver whose certificate is not signed by the configured CA is refused before
        anything is sent: a retriable error naming the verification, nothing arrives."""
        require_rsyslog("imrelp" if protocol == "relp" else "imtcp")
        relp_tls = protocol == "relp"
        with Rsyslog(tmp_path, protocol, pki=pki, relp_tls=relp_tls).start() as rs:
            m = Metrics()
            sink = _sink(rs, m, protocol=protocol, relp_tls=relp_tls,
                         tls=SyslogTLSConfig(ca_file=pki / "other-ca.crt"))
            batch = next(_batches(sink, _records(3), 3))
            with pytest.raises(SinkError, match="certificate verification failed") as ei:
                sink.deliver(batch)
            assert ei.value.retriable
            assert m.value("shipper_syslog_errors_total", rs.address, "tls") == 1
            assert m.value("shipper_syslog_records_sent_total", rs.address) == 0
            sink.close()
            time.sleep(0.2)  # give rsyslog the chance to (wrongly) write something
            assert rs.lines() == []

    def test_system_store_does_not_trust_a_private_ca(self, tmp_path: Path, pki: Path) -> None:
        """Verification is on by default: without ca_file the system store is used, and it
        does not know the test CA."""
        require_rsyslog("imtcp")
        with Rsyslog(tmp_path, "tls", pki=pki).start() as rs:
            sink = _sink(rs, Metrics(), protocol="tls")
            with pytest.raises(SinkError, match="certificate verification failed"):
                sink.deliver(next(_batches(sink, _records(1), 1)))
            sink.close()

    def test_relp_tls_client_certificate(self, tmp_path: Path, pki: Path) -> None:
        """A RELP receiver that demands a client certificate (imrelp certvalid) refuses a sink
        without one and accepts the one configured with tls.cert_file/key_file."""
        require_rsyslog("imrelp")
        with Rsyslog(tmp_path, "relp", pki=pki, relp_tls=True,
                     require_client_cert=True).start() as rs:
            m = Metrics()
            bare = _sink(rs, m, protocol="relp", relp_tls=True,
                         tls=SyslogTLSConfig(ca_file=pki / "ca.crt"))
            with pytest.raises(SinkError):
                bare.deliver(next(_batches(bare, _records(2), 2)))
            bare.close()
            sink = _sink(rs, Metrics(), protocol="relp", relp_tls=True, tls=SyslogTLSConfig(
                ca_file=pki / "ca.crt", cert_file=pki / "client.crt",
                key_file=pki / "client.key"))
            records = _records(5)
            sink.deliver(next(_batches(sink, records, 5)))
            lines = rs.wait_lines(5)
            sink.close()
        _assert_exact(lines, records, sink)

    def test_tls_client_certificate(self, tmp_path: Path, pki: Path) -> None:
        """A syslog-over-TLS receiver that demands a client certificate (x509/certvalid)
        gets every record from a sink configured with one."""
        require_rsyslog("imtcp")
        with Rsyslog(tmp_path, "tls", pki=pki, require_client_cert=True).start() as rs:
            sink = _sink(rs, Metrics(), protocol="tls", tls=SyslogTLSConfig(
                ca_file=pki / "ca.crt", cert_file=pki / "client.crt",
                key_file=pki / "client.key"))
            records = _records(5)
            sink.deliver(next(_batches(sink, records, 5)))
            lines = rs.wait_lines(5)
            sink.close()
        _assert_exact(lines, records, sink)


# --- plain TCP: what a broken connection loses is counted -----------------------------------


class TestTcpLoss:
    def test_records_the_receivers_tcp_never_acknowledged_are_counted_lost(
            self, tmp_path: Path) -> None:
        """rsyslog is frozen (SIGSTOP), batches are still accepted by our kernel (counted
        shipped: plain TCP has no ack) until ~50 KB wait unacknowledged; rsyslog is then
        killed. The sink notices the break and counts lost the records whose bytes rsyslog's
        TCP never acknowledged: more than zero, no more than are missing (what its TCP had
        acknowledged but rsyslog had not read is lost too, uncountably). After a restart
        the next batch arrives."""
        require_rsyslog("imtcp")
        with Rsyslog(tmp_path, "tcp").start() as rs:
            m = Metrics()
            sink = _sink(rs, m, protocol="tcp", send_timeout_s=2.0)
            records = _records(2000)
            batches = list(_batches(sink, records, 10))
            sink.deliver(batches[0])
            rs.wait_lines(10)
            rs.signal(signal.SIGSTOP)
            shipped = 1
            for b in batches[1:150]:
                sink.deliver(b)
                shipped += 1
                acked, written = _tcp_info(sink._conns.current.sock)  # type: ignore[union-attr,misc]
                if written - acked > 50_000:
                    break
            assert written - acked > 50_000, "the receiver's window never filled"
            rs.signal(signal.SIGKILL)
            with pytest.raises(SinkError, match="no syslog receiver reachable"):
                sink.deliver(batches[shipped])  # notices the break; reconnect is refused
            lost = m.value("shipper_syslog_records_lost_total", rs.address)
            arrived = _ids(rs.lines())
            assert arrived == [r["event"]["id"] for r in records[:len(arrived)]]
            assert 0 < lost <= shipped * 10 - len(arrived)
            assert m.value("shipper_syslog_errors_total", rs.address, "connect") == 1
            rs.start(keep_port=True)
            sink.deliver(batches[shipped])
            after = rs.wait_lines(len(arrived) + 10)
            sink.close()
        assert _ids(after[len(arrived):]) == [r["event"]["id"]
                                             for r in records[shipped * 10:shipped * 10 + 10]]


class TestStreamRestart:
    @pytest.mark.parametrize("protocol", ["tcp", "tls"])
    def test_restart_mid_stream_loses_only_what_was_in_flight(
            self, protocol: str, tmp_path: Path, pki: Path) -> None:
        """rsyslog restarts while batches stream over plain TCP/TLS (no acks): what arrives is
        in order, everything sent after the reconnect arrives, and the records counted lost
        are no more than those missing (the rest of the loss sat unread in rsyslog)."""
        require_rsyslog("imtcp")
        rs = Rsyslog(tmp_path / "rs", protocol, pki=pki if protocol == "tls" else None).start()
        m = Metrics()
        kw: dict[str, Any] = {"protocol": protocol}
        if protocol == "tls":
            kw["tls"] = SyslogTLSConfig(ca_file=pki / "ca.crt")
        sink = _sink(rs, m, **kw)
        d = Delivery(sink, m, max_batches=8, overflow="block", retry=FAST)
        d.start()
        records = _records(4000)
        want = [r["event"]["id"] for r in records]
        stop = threading.Event()

        def produce() -> None:
            for b in _batches(sink, records, 20):
                d.submit(b, stop)
                time.sleep(0.002)

        t = threading.Thread(target=produce)
        t.start()
        try:
            rs.wait_lines(800, timeout=30)
            rs.restart()
            t.join(60)
            assert d.close(30) is True
            _wait(lambda: _ids(rs.lines())[-1:] == want[-1:], what="the last record")
        finally:
            stop.set()
            t.join(5)
            rs.stop()
        ids = _ids(rs.lines())
        first = _first_seen(ids)
        assert first == sorted(first, key=want.index)  # in order, gaps allowed
        missing = [i for i in want if i not in set(ids)]
        lost = m.value("shipper_syslog_records_lost_total", rs.address)
        assert lost <= len(missing)
        if missing:  # one contiguous run around the restart, nothing lost afterwards
            lo, hi = want.index(missing[0]), want.index(missing[-1])
            assert missing == want[lo:hi + 1]
        assert m.value("shipper_records_shipped_total", "syslog") == len(records)


class TestTooLarge:
    def test_oversized_record_is_held_back_and_the_stream_stays_intact(self, tmp_path: Path
                                                                       ) -> None:
        """rsyslog (maxMessageSize 8k) would truncate a 20 KB octet-counted message and turn
        its rest into junk messages; with max_message_bytes 8192 the sink leaves it out
        (counted too_large) and rsyslog gets exactly the other records."""
        require_rsyslog("imtcp")
        rs = Rsyslog(tmp_path, "tcp", max_message_size="8k")
        with rs.start():
            m = Metrics()
            sink = _sink(rs, m, protocol="tcp", max_message_bytes=8192)
            records = _records(6)
            records[2] = {**records[2], "pad": "x" * 20_000}
            d = Delivery(sink, m, max_batches=4, overflow="block", retry=FAST)
            d.start()
            d.submit(next(_batches(sink, records, 6)))
            assert d.close(10) is True
            lines = rs.wait_lines(5)
            time.sleep(0.2)  # room for junk lines to show up, if any
            lines = rs.lines()
        _assert_exact(lines, records[:2] + records[3:], sink)
        assert m.value("shipper_records_dropped_total", "too_large") == 1
        assert m.value("shipper_records_shipped_total", "syslog") == 5


# --- RELP + spool: receiver restarts and SIGKILL lose nothing -------------------------------


class TestRelpRestart:
    def test_restart_mid_stream_loses_nothing(self, tmp_path: Path) -> None:
        """rsyslog restarts while batches stream through Delivery with a spool: every record
        arrives (duplicates only as repeats of an event.id), in first-seen order; every
        record is counted shipped once, nothing dropped."""
        require_rsyslog("imrelp")
        rs = Rsyslog(tmp_path / "rs", "relp").start()
        m = Metrics()
        sink = _sink(rs, m, protocol="relp")
        spool = Spool(tmp_path / "spool", sink_name=sink.name, metrics=m, max_bytes=32 << 20,
                      segment_bytes=64 << 10, fsync=False)
        d = Delivery(sink, m, max_batches=8, overflow="block", retry=FAST, spool=spool)
        d.start()
        records = _records(4000)
        stop = threading.Event()

        def produce() -> None:
            for b in _batches(sink, records, 20):
                d.submit(b, stop)
                time.sleep(0.002)  # a steady stream, so the restart lands mid-stream

        t = threading.Thread(target=produce)
        t.start()
        try:
            rs.wait_lines(800, timeout=30)
            rs.restart()
            t.join(60)
            _wait(lambda: spool.pending() == (0, 0), timeout=60, what="spool empty")
            assert d.close(30) is True
            want = [r["event"]["id"] for r in records]
            _wait(lambda: set(want) <= set(_ids(rs.lines())), what="rsyslog wrote everything")
        finally:
            stop.set()
            t.join(5)
            rs.stop()
        ids = _ids(rs.lines())
        assert _first_seen(ids) == want
        assert m.value("shipper_records_shipped_total", "syslog") == len(records)
        assert m.total("shipper_records_dropped_total") == 0
        assert m.total("shipper_delivery_retries_total") >= 1  # the restart was noticed








def _drain(address: str, spool: Path) -> None:
    p = start_child("syslog", address, spool, "--drain", "--timeout", "60")
    try:
        assert read_line(p, 30) == "SUBMITTED 0"
        assert read_line(p, 90) == "DRAINED", child_stderr(spool)
        assert p.wait(10) == 0
    finally:
        kill(p)


class TestRelpCrash:
    def test_sigkill_while_receiver_down_then_everything_delivered(self, tmp_path: Path
                                                                   ) -> None:
        """Shipper killed with SIGKILL while rsyslog is down; restarted, it delivers every
        spooled record once rsyslog is back, in order."""
        require_rsyslog("imrelp")
        rs = Rsyslog(tmp_path / "rs", "relp").start()
        rs.stop()
        spool = tmp_path / "spool"
        p = start_child("syslog", rs.address, spool, "--count", "1000", "--batch", "50")
        try:
            assert read_line(p, 30) == "SUBMITTED 1000"
            p.send_signal(signal.SIGKILL)
            p.wait(10)
            assert list(spool.glob("*.seg"))
            rs.start(keep_port=True)
            _drain(rs.address, spool)
            lines = rs.wait_lines(1000)
        finally:
            kill(p)
            rs.stop()
        assert _first_seen(_ids(lines)) == [f"{i:08d}" for i in range(1000)]

    def test_sigkill_with_a_batch_unacknowledged_loses_nothing(self, tmp_path: Path) -> None:
        """rsyslog is frozen (SIGSTOP) so a batch waits for its acks; the shipper is killed
        then. The restarted shipper re-sends what was not acked: every record arrives, in
        first-seen order (duplicates allowed, detectable by event.id)."""
        require_rsyslog("imrelp")
        rs = Rsyslog(tmp_path / "rs", "relp").start()
        spool = tmp_path / "spool"
        p = start_child("syslog", rs.address, spool, "--count", "2000", "--batch", "20")
        assert rs.proc is not None
        frozen = False
        try:
            rs.wait_lines(200, timeout=30)
            rs.proc.send_signal(signal.SIGSTOP)
            frozen = True
            time.sleep(0.3)  # let the child's current batch block on its acks
            p.send_signal(signal.SIGKILL)
            p.wait(10)
            rs.proc.send_signal(signal.SIGCONT)
            frozen = False
            _drain(rs.address, spool)

            def complete() -> bool:
                ids = _ids(rs.lines())
                return len(set(ids)) == int(max(ids)) + 1

            _wait(complete, what="rsyslog wrote every delivered record")
            lines = rs.lines()
        finally:
            if frozen and rs.proc is not None:
                rs.proc.send_signal(signal.SIGCONT)
            kill(p)
            rs.stop()
        ids = _ids(lines)
        spooled = int(max(ids)) + 1  # the first run may have been killed before spooling all
        assert spooled >= 200
        assert _first_seen(ids) == [f"{i:08d}" for i in range(spooled)]
