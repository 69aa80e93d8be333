"""At-least-once delivery to a forward receiver: restarts, outages with the spool, SIGKILL, TLS.

Real sockets on 127.0.0.1 (port 0), the fake receiver from ``tests/fakes``, bounded
polls. TLS material is generated per session with the ``openssl`` CLI.
"""

from __future__ import annotations

import signal
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shipper.config import ForwardSinkConfig, ForwardTLSConfig
from shipper.delivery import Delivery
from shipper.errors import SinkError
from shipper.metrics import Metrics
from shipper.sinks.base import Batch
from shipper.sinks.forward import ForwardSink
from shipper.sinks.retry import RetryPolicy
from shipper.sinks.spool import Spool
from tests.fakes.forward_receiver import PROFILES, ForwardReceiver, Received
from tests.integration.spool_child import child_stderr, kill, read_line, start_child

REPO = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000_000_000_000
FAST = RetryPolicy(initial_s=0.02, max_s=0.2)


def _ids(recs: list[Received]) -> list[int]:
    return [int(r.record["event"]["id"]) for r in recs]


def _first_seen(ids: list[int]) -> list[int]:
    seen: set[int] = set()
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


def _batches(sink: ForwardSink, n_batches: int, size: int, first: int = 0) -> Iterator[Batch]:
    for b in range(n_batches):
        ids = range(first + b * size, first + (b + 1) * size)
        entries = [sink.encode({"event": {"id": f"{i:08d}"}, "n": i}, T0 + i) for i in ids]
        yield Batch(seq=b + 1, entries=entries, times=[T0 + i for i in ids],
                    nbytes=sum(map(len, entries)), opened_mono=time.monotonic())


def _sink(addresses: list[str], m: Metrics, **kw: Any) -> ForwardSink:
    kw.setdefault("ack_timeout_s", 2.0)
    kw.setdefault("connect_timeout_s", 1.0)
    return ForwardSink(ForwardSinkConfig(addresses=addresses, **kw), m)


class TestReceiverRestart:
    def test_no_record_lost_across_restart_mid_stream(self) -> None:
        """The receiver restarts while batches stream: every record arrives (at least once),
        every record is counted shipped only after its ack, nothing is dropped."""
        rx = ForwardReceiver().start()
        m = Metrics()
        sink = _sink([rx.address], m)
        d = Delivery(sink, m, max_batches=8, overflow="block", retry=FAST)
        d.start()
        total = 200 * 25
        stop = threading.Event()

        def produce() -> None:
            for b in _batches(sink, 200, 25):
                d.submit(b, stop)
                time.sleep(0.001)  # a steady stream, so the restart lands mid-stream

        t = threading.Thread(target=produce)
        t.start()
        try:
            rx.wait_records(1000, timeout=20)
            rx.stop()
            _wait(lambda: m.total("shipper_delivery_retries_total") > 0, what="a retry")
            rx.start()
            t.join(60)
            assert d.close(30) is True
        finally:
            stop.set()
            t.join(5)
            rx.close()
        ids = _ids(rx.records())
        assert set(ids) == set(range(total))
        assert _first_seen(ids) == list(range(total))
        assert m.value("shipper_records_shipped_total", "forward") == total
        assert m.total("shipper_records_dropped_total") == 0


class TestSpoolOutage:
    def test_receiver_down_then_back_replays_in_order(self, tmp_path: Path) -> None:
        """With the receiver down every batch goes to the spool (most of them disk-only); when
        it returns everything is replayed in order and the spool empties."""
        rx = ForwardReceiver().start()
        rx.stop()
        m = Metrics()
        sink = _sink([rx.address], m)
        spool = Spool(tmp_path, sink_name=sink.name, metrics=m, max_bytes=32 << 20,
                      segment_bytes=64 << 10, fsync=True)
        d = Delivery(sink, m, max_batches=4, overflow="block", retry=FAST, spool=spool)
        d.start()
        try:
            for b in _batches(sink, 60, 40):
                d.submit(b)
            assert m.value("shipper_spool_pending_batches") >= 59  # one may be in flight
            assert m.value("shipper_records_shipped_total", "forward") == 0
            assert m.value("shipper_spool_bytes") > 0
            rx.start()
            rx.wait_records(2400, timeout=30)
            _wait(lambda: spool.pending() == (0, 0), what="spool empty")
            assert d.close(10) is True
        finally:
            rx.close()
        ids = _ids(rx.records())
        assert _first_seen(ids) == list(range(2400))
        assert m.value("shipper_records_shipped_total", "forward") == 2400
        assert m.value("shipper_spool_batches_total", "replayed") >= 50
        assert m.total("shipper_records_dropped_total") == 0








def _drain(rx: ForwardReceiver, spool: Path) -> None:
    """Start a fresh child on ``spool`` that only delivers what is spooled; wait until done."""
    p2 = start_child("forward", rx.address, spool, "--drain", "--timeout", "60")
    try:
        assert read_line(p2, 30) == "SUBMITTED 0"
        assert read_line(p2, 90) == "DRAINED", child_stderr(spool)
        assert p2.wait(10) == 0
    finally:
        kill(p2)




class TestCrash:
    def test_sigkill_while_receiver_down_then_everything_delivered(self, tmp_path: Path) -> None:
        """Shipper killed with SIGKILL while the receiver is down; restarted, it delivers every
        spooled record once the receiver is back, in order."""
        rx = ForwardReceiver().start()
        rx.stop()
        spool = tmp_path / "spool"
        p = start_child("forward", rx.address, spool, "--count", "1000", "--batch", "50")
        try:
            assert read_line(p, 30) == "SUBMITTED 1000"
            p.send_signal(signal.SIGKILL)
            p.wait(10)
            assert list(spool.glob("*.seg"))
            rx.start()
            _drain(rx, spool)
        finally:
            kill(p)
            rx.close()
        ids = _ids(rx.records())
        assert _first_seen(ids) == list(range(1000))

    def test_sigkill_mid_delivery_loses_nothing(self, tmp_path: Path) -> None:
        """Killed while batches are in flight (acks slow), the restarted shipper re-sends the
        unacknowledged ones: all records arrive, in first-seen order, duplicates allowed."""
        rx = ForwardReceiver(mode="ack_late", ack_delay_s=0.05).start()
        spool = tmp_path / "spool"
        p = start_child("forward", rx.address, spool, "--count", "2000", "--batch", "20")
        try:
            rx.wait_records(200, timeout=30)
            p.send_signal(signal.SIGKILL)
            p.wait(10)
            rx.mode = "ack"
            _drain(rx, spool)
        finally:
            kill(p)
            rx.close()
        ids = _ids(rx.records())
        # The first run may have been killed before spooling all 2000: what it spooled arrives.
        spooled = max(ids) + 1
        assert spooled >= 200
        assert _first_seen(ids) == list(range(spooled))


# --- TLS ----------------------------------------------------------------------------------


def _server_ctx(pki: Path, *, require_client: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki / "server.crt", pki / "server.key")
    if require_client:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(pki / "ca.crt")
    return ctx


def _one_batch(sink: ForwardSink) -> Batch:
    return next(_batches(sink, 1, 5))


class TestTLS:
    @pytest.mark.parametrize("profile", PROFILES)
    def test_verified_tls_delivers(self, pki: Path, profile: str) -> None:
        """With the right CA the certificate and the name (127.0.0.1) verify and records arrive."""
        with ForwardReceiver(profile=profile, tls=_server_ctx(pki)) as rx:
            sink = _sink([rx.address], Metrics(),
                         tls=ForwardTLSConfig(enabled=True, ca_file=pki / "ca.crt"))
            sink.deliver(_one_batch(sink))
            assert len(rx.records()) == 5
            sink.close()

    def test_wrong_ca_is_refused(self, pki: Path) -> None:
        """A server certificate from another CA fails verification: nothing is sent."""
        m = Metrics()
        with ForwardReceiver(tls=_server_ctx(pki)) as rx:
            sink = _sink([rx.address], m,
                         tls=ForwardTLSConfig(enabled=True, ca_file=pki / "other-ca.crt"))
            with pytest.raises(SinkError, match="certificate verification failed") as ei:
                sink.deliver(_one_batch(sink))
            assert ei.value.retriable
            assert m.value("shipper_forward_errors_total", rx.address, "tls") == 1
            assert rx.records() == []
            sink.close()

    def test_wrong_server_name_is_refused(self, pki: Path) -> None:
        """A certificate that does not name the server is refused."""
        with ForwardReceiver(tls=_server_ctx(pki)) as rx:
            sink = _sink([rx.address], Metrics(), tls=ForwardTLSConfig(
                enabled=True, ca_file=pki / "ca.crt", server_name="fluentd.example"))
            with pytest.raises(SinkError, match="certificate verification failed"):
                sink.deliver(_one_batch(sink))
            sink.close()

    def test_verify_off_accepts_any_certificate(self, pki: Path) -> None:
        """Only an explicit verify: false skips verification."""
        with ForwardReceiver(tls=_server_ctx(pki)) as rx:
            sink = _sink([rx.address], Metrics(), tls=ForwardTLSConfig(
                enabled=True, verify=False, ca_file=pki / "other-ca.crt"))
            sink.deliver(_one_batch(sink))
            assert len(rx.records()) == 5
            sink.close()

    @pytest.mark.parametrize("profile", PROFILES)
    def test_mutual_tls(self, pki: Path, profile: str) -> None:
        """A server requiring client certificates accepts ours and refuses a sender without."""
        with ForwardReceiver(profile=profile, tls=_server_ctx(pki, require_client=True)) as rx:
            without = _sink([rx.address], Metrics(),
                            tls=ForwardTLSConfig(enabled=True, ca_file=pki / "ca.crt"))
            with pytest.raises(SinkError):
                without.deliver(_one_batch(without))
            without.close()
            with_cert = _sink([rx.address], Metrics(), tls=ForwardTLSConfig(
                enabled=True, ca_file=pki / "ca.crt", cert_file=pki / "client.crt",
                key_file=pki / "client.key"))
            with_cert.deliver(_one_batch(with_cert))
            assert len(rx.records()) == 5
            with_cert.close()

    @pytest.mark.parametrize("profile", PROFILES)
    def test_tls_with_shared_key(self, pki: Path, tmp_path: Path, profile: str) -> None:
        """TLS and the shared_key handshake (no users) together: the records arrive; a wrong
        key over TLS is refused with the peer's own answer and nothing more is ingested."""
        key = tmp_path / "key"
        key.write_bytes(b"k3y")
        with ForwardReceiver(profile=profile, tls=_server_ctx(pki), shared_key=b"k3y") as rx:
            tls = ForwardTLSConfig(enabled=True, ca_file=pki / "ca.crt")
            sink = _sink([rx.address], Metrics(), tls=tls, shared_key_file=key)
            sink.deliver(_one_batch(sink))
            assert len(rx.records()) == 5 and rx.stats.handshakes_ok == 1
            sink.close()
            key.write_bytes(b"wrong")
            m = Metrics()
            bad = _sink([rx.address], m, tls=tls, shared_key_file=key)
            with pytest.raises(SinkError) as ei:
                bad.deliver(_one_batch(bad))
            bad.close()
            assert len(rx.records()) == 5  # nothing more
            assert m.value("shipper_forward_errors_total", rx.address, "auth") == 1
        text = str(ei.value)
        assert "sink.forward.shared_key_file" in text
        assert "sink.forward.username" in text and "sink.forward.password_file" in text
        if profile == "fluent-bit-5":
            assert "closed the connection instead of answering PING" in text
        else:
            assert "'shared_key mismatch'" in text

    @pytest.mark.parametrize("profile", PROFILES)
    def test_mutual_tls_with_shared_key_and_users(self, pki: Path, tmp_path: Path,
                                                  profile: str) -> None:
        """Mutual TLS, shared_key and a user together: the records arrive."""
        key, pw = tmp_path / "key", tmp_path / "pw"
        key.write_bytes(b"k3y")
        pw.write_bytes(b"pa55")
        with ForwardReceiver(profile=profile, tls=_server_ctx(pki, require_client=True),
                             shared_key=b"k3y", users={"shipper": b"pa55"}) as rx:
            sink = _sink([rx.address], Metrics(), shared_key_file=key, username="shipper",
                         password_file=pw, tls=ForwardTLSConfig(
                             enabled=True, ca_file=pki / "ca.crt",
                             cert_file=pki / "client.crt", key_file=pki / "client.key"))
            sink.deliver(_one_batch(sink))
            sink.close()
            assert len(rx.records()) == 5 and rx.stats.handshakes_ok == 1

    def test_missing_ca_file_is_a_start_error(self, tmp_path: Path) -> None:
        """A CA file that cannot be loaded fails when the sink is built, non-retriable."""
        with pytest.raises(SinkError) as ei:
            _sink(["127.0.0.1:1"], Metrics(),
                  tls=ForwardTLSConfig(enabled=True, ca_file=tmp_path / "nope.crt"))
        assert not ei.value.retriable
