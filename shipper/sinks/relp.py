"""RELP (rsyslog's Reliable Event Logging Protocol), client side: framing and one session.

Written by hand because no maintained Python RELP client exists: the package
index has only ``pyrelp`` 0.6 (2014), a wrapper around the C librelp, and the
protocol is small. What is implemented follows librelp 1.11 (the library
behind rsyslog's ``imrelp``), read at the source (``doc/relp.md``,
``src/relpsess.c``, ``src/relpframe.c``, ``src/copen.c``, ``src/scsyslog.c``):

* a frame is ``TXNR SP COMMAND SP DATALEN [SP DATA] LF``; the data part and its
  space are left out when DATALEN is 0;
* the client opens with ``1 open LEN commands=syslog\\nrelp_software=...\\n
  relp_version=0`` (librelp's own client offers version 0, so do we); the
  server answers ``1 rsp LEN 200 OK\\nrelp_version=0\\nrelp_software=...\\n
  commands=syslog\\n``; a session is usable only if the answer is 200 and
  offers ``commands=syslog``;
* every ``syslog`` command is answered by ``TXNR rsp 6 200 OK`` once the
  server handed the message on (rsyslog: put into its main queue), or
  ``500 ...`` if not; responses come in command order; txnr runs 1 ..
  999999999 and then wraps to 1;
* ``close`` is answered by ``TXNR rsp 0`` (no data); a server that shuts down
  sends the hint ``0 serverclose 0`` and closes.

Up to ``window`` commands may be unanswered at once (librelp's default window is
128 frames); the data of one frame is limited by the server (imrelp's
``maxDataSize``, by default rsyslog's ``maxMessageSize``).
"""

from __future__ import annotations

import socket
import ssl
import time
from collections import deque
from dataclasses import dataclass

MAX_TXNR = 999_999_999
_SOFTWARE = b"flowlog-shipper"


class RelpError(Exception):
    """A RELP session failed. ``kind`` is a metric label: ``closed``, ``send``,
    ``ack_timeout``, ``rejected``, ``open``, ``protocol``, ``tls``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        #: Set by :meth:`RelpSession.send_messages`: leading messages acked before the failure.
        self.acked = 0


@dataclass(frozen=True, slots=True)
class Frame:
    """One received RELP frame."""

    txnr: int
    command: bytes
    data: bytes


def build_frame(txnr: int, command: bytes, data: bytes = b"") -> bytes:
    """The bytes of one frame (pure)."""
    if data:
        return b"%d %s %d %s\n" % (txnr, command, len(data), data)
    return b"%d %s 0\n" % (txnr, command)


def offers(version: str) -> bytes:
    """The data of our ``open`` command (librelp's order: commands, software, version)."""
    return (b"commands=syslog\nrelp_software=" + _SOFTWARE + b"," + version.encode("ascii")
            + b"\nrelp_version=0")


def parse_offers(data: bytes) -> dict[str, list[str]]:
    """``name=v1,v2`` lines -> ``{name: [v1, v2]}`` (the open response, after its status line)."""
    out: dict[str, list[str]] = {}
    for line in data.split(b"\n"):
        if not line:
            continue
        name, _, values = line.partition(b"=")
        out[name.decode("ascii", "replace")] = [
            v.decode("ascii", "replace") for v in values.split(b",") if v
        ]
    return out


def parse_rsp(data: bytes) -> tuple[int | None, str, bytes]:
    """``rsp`` data -> (status code or None when empty, human text, command data)."""
    if not data:
        return None, "", b""
    head, _, rest = data.partition(b"\n")
    code = head[:3]
    if len(code) != 3 or not code.isdigit():
        raise RelpError("protocol", f"malformed rsp status {head[:40]!r}")
    return int(code), head[4:].decode("utf-8", "replace"), rest


class FrameReader:
    """Incremental parser of the frames a server sends; bounded in what it buffers."""

    def __init__(self, max_data: int = 1 << 20) -> None:
        self._buf = bytearray()
        self._max = max_data

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        self._buf += data

    def next(self) -> Frame | None:
        """The next complete frame, or None if more bytes are needed; RelpError if garbage."""
        buf = self._buf
        if not buf:
            return None
        sp1 = buf.find(b" ", 0, 10)  # TXNR is 1..9 digits
        if sp1 < 0:
            self._check_incomplete(10)
            return None
        sp2 = buf.find(b" ", sp1 + 1, sp1 + 34)  # COMMAND is 1..32 letters
        if sp2 < 0:
            self._check_incomplete(sp1 + 34)
            return None
        end = sp2 + 1
        limit = min(len(buf), sp2 + 11)  # DATALEN is 1..9 digits
        while end < limit and 0x30 <= buf[end] <= 0x39:
            end += 1
        if end == limit:
            self._check_incomplete(sp2 + 11)
            return None
        txnr_b, command, datalen_b = bytes(buf[:sp1]), bytes(buf[sp1 + 1:sp2]), bytes(
            buf[sp2 + 1:end])
        if not (txnr_b.isdigit() and datalen_b and command.isalpha()):
            raise RelpError("protocol", f"malformed RELP header {bytes(buf[:40])!r}")
        datalen = int(datalen_b)
        if datalen > self._max:
            raise RelpError("protocol", f"RELP frame of {datalen} bytes is too large")
        sep = buf[end]
        if datalen == 0:
            if sep != 0x0A:
                raise RelpError("protocol", f"RELP frame without trailer {bytes(buf[:40])!r}")
            del buf[:end + 1]
            return Frame(int(txnr_b), command, b"")
        if sep != 0x20:
            raise RelpError("protocol", f"RELP frame without its data {bytes(buf[:40])!r}")
        start = end + 1
        if len(buf) < start + datalen + 1:
            return None
        if buf[start + datalen] != 0x0A:
            raise RelpError("protocol", "RELP frame trailer is not LF (framing lost)")
        data = bytes(buf[start:start + datalen])
        del buf[:start + datalen + 1]
        return Frame(int(txnr_b), command, data)

    def take_oks(self, txnrs: deque[int]) -> int:
        """Fast path for the usual answer: consume ``TXNR rsp 6 200 OK\\n`` frames for the
        oldest outstanding ``txnrs``, in order, removing them; returns how many (0: the next
        frame is something else, or incomplete: use :meth:`next`)."""
        buf = self._buf
        pos = n = 0
        while txnrs:
            expected = b"%d rsp 6 200 OK\n" % txnrs[0]
            if not buf.startswith(expected, pos):
                break
            pos += len(expected)
            txnrs.popleft()
            n += 1
        if pos:
            del buf[:pos]
        return n

    def _check_incomplete(self, needed: int) -> None:
        """More bytes may complete the header, unless we already have enough to know better."""
        if len(self._buf) >= needed:
            raise RelpError("protocol", f"malformed RELP header {bytes(self._buf[:40])!r}")


class RelpSession:
    """One open RELP session on a connected socket (plain or TLS). Not thread-safe:
    one delivery worker uses it; another thread may only shut the socket down."""

    def __init__(self, sock: socket.socket, *, window: int) -> None:
        self.sock = sock
        self.window = window
        self._reader = FrameReader()
        self._txnr = 0
        self.server_offers: dict[str, list[str]] = {}

    def _next_txnr(self) -> int:
        self._txnr = 1 if self._txnr >= MAX_TXNR else self._txnr + 1
        return self._txnr

    def open(self, version: str, timeout: float) -> None:
        """Send ``open`` and check the answer: 200 and the ``syslog`` command offered."""
        txnr = self._next_txnr()
        self._send(build_frame(txnr, b"open", offers(version)), timeout)
        frame = self._read(time.monotonic() + timeout, "the open response")
        if frame.command != b"rsp" or frame.txnr != txnr:
            raise RelpError("open", f"expected the response to open, got "
                                    f"{frame.txnr} {frame.command!r}")
        code, text, rest = parse_rsp(frame.data)
        if code != 200:
            raise RelpError("open", f"server refused the session: {code} {text}".rstrip())
        self.server_offers = parse_offers(rest)
        if "relp_version" not in self.server_offers:
            raise RelpError("open", "server answered open without relp_version")
        if "syslog" not in self.server_offers.get("commands", []):
            raise RelpError("open", "server does not offer the syslog command")

    def send_messages(self, messages: list[bytes], ack_timeout: float, send_timeout: float
                      ) -> int:
        """Send each message as a ``syslog`` command, at most ``window`` unanswered.

        Returns when every message got ``200``. On failure raises RelpError whose
        ``acked`` attribute is the number of leading messages that were acked.
        """
        outstanding: deque[int] = deque()
        n = len(messages)
        sent = acked = 0
        try:
            while acked < n:
                room = self.window - len(outstanding)
                if sent < n and room > 0:
                    chunk = []
                    for m in messages[sent:sent + room]:
                        txnr = self._next_txnr()
                        outstanding.append(txnr)
                        chunk.append(build_frame(txnr, b"syslog", m))
                    sent += len(chunk)
                    self._send(b"".join(chunk), send_timeout)
                k = self._reader.take_oks(outstanding)
                if k:
                    acked += k
                    continue
                frame = self._read(time.monotonic() + ack_timeout, "an ack")
                acked += self._on_response(frame, outstanding)
        except RelpError as exc:
            exc.acked = acked
            raise
        return acked

    def _on_response(self, frame: Frame, outstanding: deque[int]) -> int:
        if frame.txnr == 0:
            if frame.command == b"serverclose":
                raise RelpError("closed", "server closed the session (serverclose)")
            return 0  # another hint: hints need no answer and carry nothing we use
        if frame.command != b"rsp":
            raise RelpError("protocol", f"unexpected command {frame.command!r} from server")
        if not outstanding or frame.txnr != outstanding[0]:
            want = outstanding[0] if outstanding else None
            raise RelpError("protocol", f"response for txnr {frame.txnr}, expected {want}")
        code, text, _ = parse_rsp(frame.data)
        if code != 200:
            raise RelpError("rejected", f"server answered {code} {text}".rstrip())
        outstanding.popleft()
        return 1

    def close(self, timeout: float) -> None:
        """Polite close: ``close`` and wait for its response (errors ignored by the caller)."""
        txnr = self._next_txnr()
        self._send(build_frame(txnr, b"close"), timeout)
        deadline = time.monotonic() + timeout
        while True:
            frame = self._read(deadline, "the close response")
            if frame.txnr == txnr and frame.command == b"rsp":
                return

    def _send(self, data: bytes, timeout: float) -> None:
        try:
            self.sock.settimeout(timeout)
            self.sock.sendall(data)
        except TimeoutError as exc:
            raise RelpError("send", "write timed out") from exc
        except ssl.SSLError as exc:
            raise RelpError("tls", f"TLS error on write: {exc}") from exc
        except OSError as exc:
            raise RelpError("send", f"write failed: {exc.strerror or exc}") from exc

    def _read(self, deadline: float, what: str) -> Frame:
        while True:
            frame = self._reader.next()
            if frame is not None:
                return frame
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RelpError("ack_timeout", f"timed out waiting for {what}")
            try:
                self.sock.settimeout(remaining)
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except ssl.SSLError as exc:
                raise RelpError("tls", f"TLS error while waiting for {what}: {exc}") from exc
            except OSError as exc:
                raise RelpError("closed", f"connection lost while waiting for {what}: "
                                          f"{exc.strerror or exc}") from exc
            if not data:
                raise RelpError("closed", f"server closed the connection while we waited "
                                          f"for {what}")
            self._reader.feed(data)
