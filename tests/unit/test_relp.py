"""RELP client: framing (pure) on bytes captured from rsyslog 8.2302 / librelp 1.11, and the
session against the librelp-profile fake on port 0."""

from __future__ import annotations

import socket
import threading

import pytest

from shipper.sinks import relp
from shipper.sinks.relp import Frame, FrameReader, RelpError, RelpSession
from tests.fakes.relp_receiver import Plan, RelpReceiver

# What the real rsyslog 8.2302 (librelp 1.11) answered here, byte for byte.
REAL_OPEN_RSP = (b"1 rsp 93 200 OK\nrelp_version=0\nrelp_software=librelp,1.11.0,"
                 b"http://librelp.adiscon.com\ncommands=syslog\n")
REAL_SYSLOG_RSP = b"2 rsp 6 200 OK\n"
REAL_CLOSE_RSP = b"3 rsp 0\n0 serverclose 0\n"


def _frames(data: bytes) -> list[Frame]:
    r = FrameReader()
    r.feed(data)
    out = []
    while (f := r.next()) is not None:
        out.append(f)
    return out


class TestFraming:
    def test_frames_with_and_without_data(self) -> None:
        """build_frame writes ``TXNR SP CMD SP LEN SP DATA LF``, and leaves out the data part
        and its space when there is no data (librelp's relpFrameBuildSendbuf)."""
        assert relp.build_frame(2, b"syslog", b"<14>1 x") == b"2 syslog 7 <14>1 x\n"
        assert relp.build_frame(3, b"close") == b"3 close 0\n"

    def test_open_offers_as_librelp_sends_them(self) -> None:
        """Our open offers commands, software and version in librelp's order and syntax."""
        assert relp.offers("1.2") == (b"commands=syslog\nrelp_software=flowlog-shipper,1.2\n"
                                      b"relp_version=0")

    def test_real_open_response_parses(self) -> None:
        """rsyslog's open response: 200, relp_version 0 and the syslog command."""
        (f,) = _frames(REAL_OPEN_RSP)
        assert (f.txnr, f.command) == (1, b"rsp")
        code, text, rest = relp.parse_rsp(f.data)
        assert (code, text) == (200, "OK")
        offers = relp.parse_offers(rest)
        assert offers["relp_version"] == ["0"]
        assert offers["commands"] == ["syslog"]
        assert offers["relp_software"][0] == "librelp"

    def test_real_close_response_and_serverclose_hint(self) -> None:
        """``rsp 0`` (no data) and the txnr-0 hint that follows it are two frames."""
        assert _frames(REAL_CLOSE_RSP) == [Frame(3, b"rsp", b""), Frame(0, b"serverclose", b"")]
        assert relp.parse_rsp(b"") == (None, "", b"")

    def test_frames_split_at_every_byte(self) -> None:
        """A frame fed one byte at a time comes out once, whole."""
        r = FrameReader()
        got = []
        for i in range(len(REAL_OPEN_RSP + REAL_SYSLOG_RSP)):
            r.feed((REAL_OPEN_RSP + REAL_SYSLOG_RSP)[i:i + 1])
            while (f := r.next()) is not None:
                got.append(f)
        assert [(f.txnr, f.command) for f in got] == [(1, b"rsp"), (2, b"rsp")]
        assert got[1].data == b"200 OK"

    @pytest.mark.parametrize("garbage", [
        b"HTTP/1.1 400 Bad Request\r\n\r\n",
        b"1 rsp 6 200 OK!",  # trailer is not LF
        b"x rsp 6 200 OK\n",
        b"1 rsp 6\n",  # no data part although DATALEN is 6
        b"1 r5p 0\n",
        b"1234567890123 rsp 0\n",
    ])
    def test_garbage_is_a_protocol_error(self, garbage: bytes) -> None:
        """Bytes that are not RELP raise RelpError(protocol) instead of waiting forever."""
        r = FrameReader()
        r.feed(garbage)
        with pytest.raises(RelpError) as ei:
            r.next()
        assert ei.value.kind == "protocol"

    def test_fast_ack_path_stops_at_anything_else(self) -> None:
        """take_oks consumes in-order ``200 OK`` answers for the outstanding txnrs and leaves
        a different answer (here a 500) and everything after it to the full parser."""
        from collections import deque

        r = FrameReader()
        r.feed(b"5 rsp 6 200 OK\n6 rsp 6 200 OK\n7 rsp 20 500 command disabled\n8 rsp 6 200")
        pending = deque([5, 6, 7, 8])
        assert r.take_oks(pending) == 2
        assert list(pending) == [7, 8]
        assert r.next() == Frame(7, b"rsp", b"500 command disabled")
        assert r.take_oks(deque([9])) == 0  # not the expected txnr
        assert r.take_oks(deque([8])) == 0  # incomplete
        r.feed(b" OK\n")
        assert r.take_oks(deque([8])) == 1

    def test_oversized_frame_is_refused(self) -> None:
        """A DATALEN beyond the reader's limit is an error, not a buffer."""
        r = FrameReader(max_data=10)
        r.feed(b"1 rsp 11 ")
        with pytest.raises(RelpError, match="too large"):
            r.next()

    def test_malformed_status_is_a_protocol_error(self) -> None:
        """An rsp whose data does not start with a 3-digit code is refused."""
        with pytest.raises(RelpError):
            relp.parse_rsp(b"OK")


def _session(rx: RelpReceiver, window: int = 128) -> RelpSession:
    host, port = rx.address.split(":")
    s = RelpSession(socket.create_connection((host, int(port)), timeout=2), window=window)
    s.open("test", 2.0)
    return s


class TestSession:
    def test_open_send_close(self) -> None:
        """A session opens (offers sent as librelp does), every message is acked in order,
        and close is answered."""
        rx = RelpReceiver()
        try:
            s = _session(rx)
            msgs = [b"<134>1 - h a 1 new - {\"i\":%d}" % i for i in range(300)]
            assert s.send_messages(msgs, 2.0, 2.0) == 300
            s.close(2.0)
            s.sock.close()
        finally:
            rx.close()
        assert rx.opens == [relp.offers("test")]
        assert rx.acked == msgs

    def test_rejected_message_reports_the_acked_prefix(self) -> None:
        """A ``500`` for the 4th message fails the batch with kind ``rejected`` and says the
        first 3 were acked."""
        rx = RelpReceiver(plans=[Plan(reject_at=4)])
        try:
            s = _session(rx, window=1)
            with pytest.raises(RelpError) as ei:
                s.send_messages([b"m%d" % i for i in range(10)], 2.0, 2.0)
            s.sock.close()
        finally:
            rx.close()
        assert ei.value.kind == "rejected"
        assert ei.value.acked == 3

    def test_serverclose_mid_batch_is_a_closed_session(self) -> None:
        """The ``serverclose`` hint while acks are due fails the batch as ``closed`` with the
        acked prefix."""
        rx = RelpReceiver(plans=[Plan(ack_then_close=5)])
        try:
            s = _session(rx, window=1)
            with pytest.raises(RelpError) as ei:
                s.send_messages([b"m%d" % i for i in range(10)], 2.0, 2.0)
            s.sock.close()
        finally:
            rx.close()
        assert ei.value.kind == "closed"
        assert ei.value.acked == 5

    def test_window_bounds_unanswered_commands(self) -> None:
        """With window 3 the client never has more than 3 syslog commands unanswered."""
        a, b = socket.socketpair()
        s = RelpSession(a, window=3)
        seen: list[int] = []

        def server() -> None:
            r = FrameReader()
            pending: list[int] = []
            total = 0
            b.settimeout(2)
            while total < 10:
                r.feed(b.recv(65536))
                while (f := r.next()) is not None:
                    pending.append(f.txnr)
                seen.append(len(pending))
                try:
                    b.settimeout(0.05)
                    more = b.recv(65536, socket.MSG_PEEK)
                except TimeoutError:
                    more = b""
                finally:
                    b.settimeout(2)
                if not more:
                    for t in pending:
                        b.sendall(relp.build_frame(t, b"rsp", b"200 OK"))
                    total += len(pending)
                    pending = []

        t = threading.Thread(target=server)
        t.start()
        try:
            assert s.send_messages([b"m%d" % i for i in range(10)], 2.0, 2.0) == 10
        finally:
            t.join(5)
            a.close()
            b.close()
        assert max(seen) == 3

    def test_txnr_wraps_to_one(self) -> None:
        """After 999999999 the next txnr is 1 (0 is reserved for hints)."""
        a, b = socket.socketpair()
        try:
            s = RelpSession(a, window=1)
            s._txnr = relp.MAX_TXNR - 1
            assert s._next_txnr() == relp.MAX_TXNR
            assert s._next_txnr() == 1
        finally:
            a.close()
            b.close()

    def test_open_refused_without_syslog_command(self) -> None:
        """A server whose open answer does not offer ``syslog`` is refused (librelp's client
        would not send syslog commands either)."""
        a, b = socket.socketpair()
        try:
            b.sendall(b"1 rsp 21 200 OK\nrelp_version=0\n")
            with pytest.raises(RelpError, match="syslog command") as ei:
                RelpSession(a, window=1).open("t", 1.0)
            assert ei.value.kind == "open"
        finally:
            a.close()
            b.close()

    def test_silent_server_times_out(self) -> None:
        """No answer within the timeout is ``ack_timeout``."""
        a, b = socket.socketpair()
        try:
            with pytest.raises(RelpError) as ei:
                RelpSession(a, window=1).open("t", 0.2)
            assert ei.value.kind == "ack_timeout"
        finally:
            a.close()
            b.close()
