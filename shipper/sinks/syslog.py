"""syslog sink: RFC 5424 messages to rsyslog / syslog-ng over TCP, TLS or RELP.

Message (RFC 5424, built by :meth:`SyslogSink.encode`, pure)::

    <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG

* PRI = facility * 8 + severity. Severity comes from the record (see
  :func:`severity`): ``gap`` records are 4 (warning), flow records whose pod is
  not known for sure (``flowlog.attribution`` ``uncertain``, ``unresolved`` or
  ``stale``) are 5 (notice), the rest 6 (informational).
* TIMESTAMP is the record's ``@timestamp`` (RFC 3339, UTC, microseconds);
  HOSTNAME the record's ``host.name``; PROCID the shipper's PID; MSGID the
  record's ``event.action`` (``new``, ``destroy``, ``gap``, ...). Header fields are
  reduced to printable ASCII (RFC 5424 PRINTUSASCII), ``-`` when empty.
* No STRUCTURED-DATA (``-``); MSG is the JSON record, UTF-8 without a BOM
  (rsyslog keeps a BOM as part of ``msg``, which breaks JSON parsers).

Transports (``sink.syslog.protocol``):

* ``relp``: each message is a RELP ``syslog`` command
  (:mod:`shipper.sinks.relp`); :meth:`deliver` returns only after every message
  of the batch got ``rsp 200 OK``, so a record is counted shipped only after
  its ack. When a session breaks mid-batch, the acked prefix is remembered and
  the retry of the same batch sends only the rest; a batch replayed from the
  spool after a crash may repeat records (``event.id`` tells duplicates).
* ``tcp`` (RFC 6587 octet counting: ``LEN SP MSG``) and ``tls`` (the same
  inside TLS, RFC 5425): there is no acknowledgement. :meth:`deliver` returns
  once the kernel accepted the bytes, and the records are counted shipped
  then. **What a broken connection loses**: every record whose bytes the
  kernel had accepted but the receiver had not processed, that is (a) bytes
  our TCP had sent or queued but the receiver's TCP never acknowledged, and
  (b) bytes the receiver's TCP acknowledged that were still in its socket
  buffer or its in-memory queue when it went away. (a) is counted exactly
  when the break is noticed (``shipper_syslog_records_lost_total``, from the
  kernel's ``tcpi_bytes_acked`` against the end offset of each batch; with TLS
  the offsets are of TLS records, so a partly acknowledged batch is counted
  whole). (b) cannot be seen by a sender without an application-level
  acknowledgement: use ``relp``.
* Size: a message longer than ``max_message_bytes`` is never sent (rsyslog
  truncates it, and with octet counting parses its rest as junk messages);
  :meth:`SyslogSink.deliver` returns such records as ``too_large`` and the
  delivery worker counts them dropped.
* No UDP: a datagram can be lost or truncated without anyone knowing, and
  nothing sent over it could honestly be counted as delivered.

Not the standard library's ``logging.handlers.SysLogHandler``: it writes RFC
3164-style messages (no version, no RFC 3339 timestamp, no MSGID) terminated
by a NUL or newline instead of octet counting, has no TLS and no acks, and
reports errors through ``handleError`` instead of raising.

Failover and reconnects work as in the forward sink: addresses are tried in
order, an endpoint that failed within ``endpoint_cooldown_s`` last.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import ssl
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from shipper import __version__
from shipper.ecs import rfc3339
from shipper.errors import SinkError
from shipper.sinks.base import Batch, EntryFormat
from shipper.sinks.net import (
    Connections,
    Endpoint,
    StepFailure,
    build_ssl_context,
    close_quietly,
    open_connection,
    oserror_text,
    stale,
)
from shipper.sinks.relp import RelpError, RelpSession

if TYPE_CHECKING:
    from shipper.config import SyslogSinkConfig
    from shipper.metrics import Metrics

log = logging.getLogger("shipper.sinks.syslog")

SEV_WARNING = 4
SEV_NOTICE = 5
SEV_INFO = 6
_NOTICE_ATTRIBUTIONS = frozenset({"uncertain", "unresolved", "stale"})
_NOT_PRINTUSASCII = re.compile(rb"[^\x21-\x7e]")

# struct tcp_info (linux/tcp.h): tcpi_bytes_acked at 120 (counts the SYN too),
# tcpi_notsent_bytes at 144, tcpi_bytes_sent and tcpi_bytes_retrans at 200.
_TCP_INFO_LEN = 216


def severity(record: dict[str, Any]) -> int:
    """RFC 5424 severity of a record: 4 for ``gap``, 5 when the pod is not known for
    sure, else 6."""
    ev = record.get("event")
    if isinstance(ev, dict) and ev.get("kind") == "pipeline_error":
        return SEV_WARNING
    fl = record.get("flowlog")
    if isinstance(fl, dict) and fl.get("attribution") in _NOTICE_ATTRIBUTIONS:
        return SEV_NOTICE
    return SEV_INFO


def header_field(value: Any, max_len: int) -> bytes:
    """A header field: printable ASCII only (others become ``_``), at most ``max_len``,
    ``-`` when empty (RFC 5424 NILVALUE)."""
    if not isinstance(value, str) or not value:
        return b"-"
    raw = _NOT_PRINTUSASCII.sub(b"_", value.encode("utf-8", "replace"))[:max_len]
    return raw or b"-"


def octet_frame(messages: list[bytes]) -> bytes:
    """RFC 6587 octet counting: ``LEN SP MSG`` for each message, concatenated."""
    return b"".join(b"%d %s" % (len(m), m) for m in messages)


_Failure = StepFailure  # one failed step, with the error kind used as a metric label


@dataclass(slots=True)
class _Sent:
    """A batch written on a tcp/tls connection, not yet known to have reached the peer."""

    wire_end: int  # the connection's byte offset after this batch (TLS: ciphertext)
    sizes: list[int]  # framed size of each record (plaintext)
    plain: bool  # wire bytes == framed bytes (no TLS): per-record accounting is exact


@dataclass(slots=True)
class _Conn:
    sock: socket.socket
    endpoint: Endpoint
    relp: RelpSession | None = None
    unconfirmed: deque[_Sent] = field(default_factory=deque)


class SyslogSink:
    """RFC 5424 over tcp / tls / relp, with failover; see the module docstring."""

    name = "syslog"
    entry_format: EntryFormat = "rfc5424"

    def __init__(self, cfg: SyslogSinkConfig, metrics: Metrics, *, clock: Any = time.monotonic
                 ) -> None:
        from shipper.config import FACILITIES

        self.cfg = cfg
        self.metrics = metrics
        #: RELP: ``deliver`` returns only after ``rsp 200 OK`` for every message; tcp/tls
        #: have no acknowledgement (see the module docstring for what that can lose).
        self.acknowledged = cfg.protocol == "relp"
        self._tls = cfg.protocol == "tls" or (cfg.protocol == "relp" and cfg.relp_tls)
        self._ssl = build_ssl_context(cfg.tls) if self._tls else None
        if self._tls and not cfg.tls.verify:
            log.warning("syslog TLS certificate verification is disabled",
                        extra={"fields": {"sink": self.name}})
        if cfg.protocol != "relp":
            log.warning("syslog over tcp/tls has no acknowledgement: records the receiver had "
                        "not processed when a connection breaks are lost (use protocol relp)",
                        extra={"fields": {"sink": self.name, "protocol": cfg.protocol}})
        fac = FACILITIES[cfg.facility]
        self._pri = {sev: b"<%d>1 " % (fac * 8 + sev) for sev in (SEV_WARNING, SEV_NOTICE,
                                                                 SEV_INFO)}
        self._mid = b" " + header_field(cfg.app_name, 48) + b" %d " % os.getpid()
        self._headers: dict[tuple[int, Any, Any], tuple[bytes, bytes]] = {}
        self._partial: tuple[Batch, int] | None = None  # RELP: batch and its acked prefix
        self._clock = clock
        self._conns: Connections[_Conn] = Connections(
            "syslog", cfg.addresses, metrics=metrics, log=log,
            cooldown_s=cfg.endpoint_cooldown_s, clock=clock, open=self._open,
            connected_fields=lambda: {"protocol": cfg.protocol, "tls": self._tls},
            before_close=self._settle)

    # --- encoding (pure, on the event path) ----------------------------------------------

    def encode(self, record: dict[str, Any], time_ns: int) -> bytes:
        """One RFC 5424 message (no framing: that is the transport's)."""
        ev = record.get("event") or {}
        host = (record.get("host") or {}).get("name")
        sev = severity(record)
        key = (sev, host, ev.get("action"))
        parts = self._headers.get(key)
        if parts is None:
            parts = (self._pri[sev], b" " + header_field(host, 255) + self._mid
                     + header_field(key[2], 32) + b" - ")
            if len(self._headers) < 256:  # a few hosts x actions x severities
                self._headers[key] = parts
        ts = record.get("@timestamp")
        if not isinstance(ts, str):
            ts = rfc3339(time_ns)
        return b"%s%s%s%s" % (parts[0], ts.encode("ascii", "replace"), parts[1],
                              orjson.dumps(record))

    # --- the Sink protocol --------------------------------------------------------------

    def deliver(self, batch: Batch) -> dict[str, int] | None:
        """Send the batch; with RELP return only once every message was acked.

        Messages longer than ``max_message_bytes`` are left out (the receiver would
        truncate them, and with octet counting rsyslog turns the rest into junk
        messages): they are returned as ``{"too_large": n}`` for the delivery worker
        to count, and logged with their event ids. SinkError(retriable=True) on any
        failure (the connection is dropped; the next attempt reconnects, failing over).
        """
        limit = self.cfg.max_message_bytes
        entries = batch.entries
        big = [m for m in entries if len(m) > limit]
        if big:
            entries = [m for m in entries if len(m) <= limit]
        if entries:
            conn = self._conns.get()
            ep = conn.endpoint
            try:
                if conn.relp is not None:
                    self._deliver_relp(conn, batch, entries)
                else:
                    self._deliver_stream(conn, entries)
            except _Failure as f:
                self._conns.fail(conn, f)
                raise SinkError(f"syslog to {ep.label}: {f}", retriable=True) from None
        if not big:
            return None
        log.error("records larger than sink.syslog.max_message_bytes not sent (raise it "
                  "together with the receiver's limit, e.g. rsyslog maxMessageSize)",
                  extra={"fields": {"records": len(big), "max_message_bytes": limit,
                                    "sizes": [len(m) for m in big[:5]],
                                    "event_ids": [_event_id(m) for m in big[:5]]}})
        return {"too_large": len(big)}

    def _deliver_relp(self, conn: _Conn, batch: Batch, entries: list[bytes]) -> None:
        assert conn.relp is not None
        ep = conn.endpoint
        skip = self._partial[1] if self._partial is not None and self._partial[0] is batch else 0
        todo = entries[skip:] if skip else entries
        self._partial = None
        cfg = self.cfg
        self.metrics.inc("shipper_syslog_records_sent_total", ep.label, n=len(todo))
        started = self._clock()
        try:
            conn.relp.send_messages(todo, cfg.ack_timeout_s, cfg.send_timeout_s)
        except RelpError as exc:
            if exc.acked:
                self.metrics.inc("shipper_syslog_records_acked_total", ep.label, n=exc.acked)
            self._partial = (batch, skip + exc.acked)
            raise _Failure(exc.kind, str(exc)) from None
        self.metrics.inc("shipper_syslog_records_acked_total", ep.label, n=len(todo))
        self.metrics.observe("shipper_syslog_ack_latency_seconds", self._clock() - started,
                             ep.label)

    def _deliver_stream(self, conn: _Conn, entries: list[bytes]) -> None:
        ep = conn.endpoint
        data = octet_frame(entries)
        try:
            conn.sock.settimeout(self.cfg.send_timeout_s)
            conn.sock.sendall(data)
        except TimeoutError as exc:
            raise _Failure("send", "write timed out") from exc
        except ssl.SSLError as exc:
            raise _Failure("tls", f"TLS error on write: {exc}") from exc
        except OSError as exc:
            raise _Failure("closed", f"write failed: {oserror_text(exc)}") from exc
        self.metrics.inc("shipper_syslog_records_sent_total", ep.label, n=len(entries))
        info = _tcp_info(conn.sock)
        if info is not None:
            acked, written = info
            conn.unconfirmed.append(_Sent(written, [len(m) + len(b"%d " % len(m))
                                                    for m in entries], self._ssl is None))
            _confirm(conn.unconfirmed, acked)

    def abort(self) -> None:
        """Interrupt a blocked ``deliver`` from another thread (shutdown grace over)."""
        self._conns.abort()

    def close(self) -> None:
        """Close the connection: RELP says ``close``; tcp/tls wait (at most 5 s) until the
        receiver's TCP acknowledged what was written; what it did not is counted lost if
        the receiver closed or reset the connection, else logged (the kernel keeps
        sending after our close)."""
        conn, aborted = self._conns.take()
        if conn is None:
            return
        timeout = min(self.cfg.send_timeout_s, 5.0)
        if conn.relp is not None and not aborted:
            with contextlib.suppress(RelpError):
                conn.relp.close(min(timeout, 1.0))
        elif conn.unconfirmed and not aborted:
            deadline = time.monotonic() + timeout
            while conn.unconfirmed and time.monotonic() < deadline:
                info = _tcp_info(conn.sock)
                if info is None:
                    break
                _confirm(conn.unconfirmed, info[0])
                if conn.unconfirmed:
                    time.sleep(0.01)
        # Still unacknowledged and the peer closed or reset: the kernel drops it, count it.
        self._conns.close(conn, broken=bool(conn.unconfirmed) and stale(conn.sock))

    # --- connections ------------------------------------------------------------------

    def _open(self, ep: Endpoint) -> _Conn:
        timeout = self.cfg.connect_timeout_s
        sock = open_connection(ep.host, ep.port, timeout, self._ssl, self.cfg.tls.server_name)
        try:
            conn = _Conn(sock, ep)
            if self.cfg.protocol == "relp":
                session = RelpSession(sock, window=self.cfg.relp_window)
                try:
                    session.open(__version__, timeout)
                except RelpError as exc:
                    kind = "open" if exc.kind in ("closed", "ack_timeout", "protocol") else (
                        exc.kind)
                    raise _Failure(kind, f"RELP open failed (is this a RELP listener?): "
                                         f"{exc}") from exc
                conn.relp = session
        except BaseException:
            close_quietly(sock)
            raise
        return conn

    def _settle(self, conn: _Conn, broken: bool) -> None:
        """Before the socket closes. On a connection the peer broke (EOF, reset, write
        error) the kernel discards what the peer's TCP did not acknowledge: count those
        records lost. When we close a live one (write timeout, shutdown) the kernel keeps
        sending after the close, so their fate is unknown: logged, not counted."""
        if conn.unconfirmed and not broken:
            log.warning("syslog connection closed with records the receiver's TCP had not "
                        "acknowledged yet; the kernel keeps sending them", extra={"fields": {
                            "endpoint": conn.endpoint.label,
                            "records": sum(len(s.sizes) for s in conn.unconfirmed)}})
            conn.unconfirmed.clear()
        if conn.unconfirmed:
            info = _tcp_info(conn.sock)
            if info is not None:
                _confirm(conn.unconfirmed, info[0])
            lost = _unreceived(conn.unconfirmed, info[0] if info is not None else None)
            conn.unconfirmed.clear()
            if lost:
                self.metrics.inc("shipper_syslog_records_lost_total", conn.endpoint.label,
                                 n=lost)
                log.error("syslog connection broke: records already counted as shipped never "
                          "reached the receiver", extra={"fields": {
                              "endpoint": conn.endpoint.label, "records": lost,
                              "protocol": self.cfg.protocol}})




def _event_id(message: bytes) -> str:
    """The event.id of an encoded message (for log lines about it), or ``?``."""
    start = message.find(b" - {")
    if start < 0:
        return "?"
    try:
        return str(orjson.loads(message[start + 3:])["event"]["id"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "?"


def _tcp_info(sock: socket.socket) -> tuple[int, int] | None:
    """(data bytes the peer's TCP acknowledged, data bytes written) from the kernel, or
    None where TCP_INFO lacks the fields (Linux < 4.19)."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return None
    if len(raw) < _TCP_INFO_LEN:
        return None
    (acked,) = struct.unpack_from("=Q", raw, 120)
    (notsent,) = struct.unpack_from("=I", raw, 144)
    sent, retrans = struct.unpack_from("=QQ", raw, 200)
    written = sent - retrans + notsent
    return min(max(acked - 1, 0), written), written  # acked counts the SYN (and our FIN)


def _confirm(unconfirmed: deque[_Sent], acked: int) -> None:
    """Forget batches that reached the receiver's TCP entirely."""
    while unconfirmed and unconfirmed[0].wire_end <= acked:
        unconfirmed.popleft()


def _unreceived(unconfirmed: deque[_Sent], acked: int | None) -> int:
    """Records of ``unconfirmed`` batches whose bytes the peer's TCP did not acknowledge."""
    lost = 0
    for s in unconfirmed:
        if acked is None or not s.plain:
            lost += len(s.sizes)
            continue
        end = s.wire_end
        for size in reversed(s.sizes):  # last record first: it ends at wire_end
            if end <= acked:
                break
            lost += 1
            end -= size
    return lost





