"""forward sink: batches to Fluentd / Fluent Bit over the forward protocol v1.

This module is the I/O half (Fluent Bit's forward.c): connections, failover,
TLS, the HELO/PING/PONG shared_key handshake and ack reading. Encoding lives
in :mod:`shipper.sinks.forward_format` (pure).

Delivery contract (at least once):

* with ``ack`` on (the default) every batch carries a fresh ``chunk`` id and
  :meth:`ForwardSink.deliver` returns only after the matching ``{"ack": id}``
  arrived within ``ack_timeout_s``;
* anything else - refused connection, TLS or handshake failure, a write error,
  a timeout, EOF, a mismatched ack, bytes that are not msgpack - closes the
  connection and raises ``SinkError(retriable=True)``. The delivery worker
  retries the same batch with jittered exponential backoff on a fresh
  connection, so the receiver may get a batch twice: records carry
  ``event.id`` for deduplication.

Authentication failures are retriable on purpose. A wrong shared_key does not
fix itself, but the usual way it gets fixed is a Secret rotation on one side,
and the key file is re-read on every connection; treating it as final would
drop every batch (compliance data) for as long as the two sides disagree.
Instead the failure is logged at ERROR with a message that says what to fix,
counted in ``shipper_forward_errors_total{error="auth"}``, and the batches
wait in the queue or the spool.

Failover: a new connection tries the addresses in configured order, except
that an endpoint that failed within ``endpoint_cooldown_s`` is tried after
the healthy ones. A connection is kept open across batches; when it breaks,
the next attempt fails over.

Threading: ``deliver`` is called by one delivery worker; ``abort`` and
``close`` may be called from another thread to interrupt a blocked wait.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from shipper.errors import SinkError
from shipper.sinks.base import Batch, EntryFormat
from shipper.sinks.forward_format import (
    build_message,
    build_ping,
    encode_entry,
    new_chunk_id,
    pack_str,
    pong_digest,
)
from shipper.sinks.net import (
    Connections,
    Endpoint,
    StepFailure,
    build_ssl_context,
    close_quietly,
    open_connection,
    oserror_text,
)

if TYPE_CHECKING:
    from shipper.config import ForwardSinkConfig
    from shipper.metrics import Metrics

log = logging.getLogger("shipper.sinks.forward")

_MAX_REPLY = 1024 * 1024  # a receiver's replies are tiny; more than this is garbage


_Failure = StepFailure  # one failed step, with the error kind used as a metric label


@dataclass(slots=True)
class _Conn:
    sock: socket.socket
    endpoint: Endpoint
    unpacker: msgpack.Unpacker


def read_secret(path: Path, what: str) -> bytes:
    """Read a key or password file (trailing newlines removed); SinkError if unusable.

    The content never appears in an error message.
    """
    try:
        data = Path(path).read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        raise SinkError(f"cannot read {what} file {path}: {exc.strerror or exc}",
                        retriable=True) from exc
    if not data:
        raise SinkError(f"{what} file {path} is empty", retriable=True)
    return data




class ForwardSink:
    """Sends batches as Forward / PackedForward / CompressedPackedForward / Message mode."""

    name = "forward"
    encode = staticmethod(encode_entry)
    entry_format: EntryFormat = "msgpack"

    def __init__(
        self,
        cfg: ForwardSinkConfig,
        metrics: Metrics,
        *,
        clock: Any = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        #: With ``ack`` on, ``deliver`` returns only after the receiver's ``{"ack": chunk}``.
        self.acknowledged = cfg.ack
        self._tag = pack_str(cfg.tag)
        self._ssl = build_ssl_context(cfg.tls) if cfg.tls.enabled else None
        if cfg.tls.enabled and not cfg.tls.verify:
            log.warning("forward TLS certificate verification is disabled",
                        extra={"fields": {"sink": self.name}})
        self._hostname = cfg.self_hostname or os.environ.get("NODE_NAME") or socket.gethostname()
        if cfg.shared_key_file is not None:
            read_secret(cfg.shared_key_file, "shared_key")  # fail early if unreadable
        self._clock = clock
        self._conns: Connections[_Conn] = Connections(
            "forward", cfg.addresses, metrics=metrics, log=log,
            cooldown_s=cfg.endpoint_cooldown_s, clock=clock, open=self._open,
            connected_fields=lambda: {"tls": self._ssl is not None,
                                      "shared_key": cfg.shared_key_file is not None},
            on_failure=_log_auth_failure)

    # --- the Sink protocol ------------------------------------------------------------

    def deliver(self, batch: Batch) -> None:
        """Send the batch and, with acks on, wait for its ack; SinkError(retriable) otherwise."""
        if not batch.entries:
            return
        cfg = self.cfg
        chunk = new_chunk_id() if cfg.ack else None
        data = build_message(cfg.mode, self._tag, batch.entries, chunk,
                             compression_level=cfg.compression_level)
        conn = self._conns.get()
        ep = conn.endpoint
        n = len(batch.entries)
        try:
            self._send(conn, data)
            self.metrics.inc("shipper_forward_batches_sent_total", ep.label)
            self.metrics.inc("shipper_forward_records_sent_total", ep.label, n=n)
            if chunk is None:
                return
            sent_at = self._clock()
            self._await_ack(conn, chunk.encode("ascii"))
        except _Failure as f:
            self._conns.fail(conn, f)
            raise SinkError(f"forward to {ep.label}: {f}", retriable=True) from None
        self.metrics.observe("shipper_forward_ack_latency_seconds", self._clock() - sent_at,
                             ep.label)
        self.metrics.inc("shipper_forward_batches_acked_total", ep.label)
        self.metrics.inc("shipper_forward_records_acked_total", ep.label, n=n)

    def abort(self) -> None:
        """Interrupt a blocked ``deliver`` from another thread (shutdown grace over)."""
        self._conns.abort()

    def close(self) -> None:
        """Close the connection, if any."""
        conn, _aborted = self._conns.take()
        if conn is not None:
            self._conns.close(conn, broken=False)

    # --- connections ------------------------------------------------------------------

    def _open(self, ep: Endpoint) -> _Conn:
        timeout = self.cfg.connect_timeout_s
        sock = open_connection(ep.host, ep.port, timeout, self._ssl, self.cfg.tls.server_name)
        try:
            conn = _Conn(sock, ep, msgpack.Unpacker(raw=True, max_buffer_size=_MAX_REPLY))
            if self.cfg.shared_key_file is not None:
                self._handshake(conn, time.monotonic() + timeout)
        except BaseException:
            close_quietly(sock)
            raise
        return conn

    def _handshake(self, conn: _Conn, deadline: float) -> None:
        """HELO -> PING -> PONG, checking the server's digest (FACTS: one write, wait PONG).

        Every HELO is answered, whether or not its ``auth`` salt is set: Fluent Bit 5 and
        Fluentd 1 both send a 16-byte salt whenever the handshake is on, users or not, and
        look at the user fields only when they have users configured. Without configured
        credentials we answer as Fluentd's out_forward does (empty username, digest of an
        empty username and password) and let the PONG decide.
        """
        assert self.cfg.shared_key_file is not None
        key = _secret(self.cfg.shared_key_file, "shared_key")
        helo = self._read_reply(conn, deadline, "HELO", eof_kind="closed")
        if not (isinstance(helo, list) and len(helo) == 2 and helo[0] == b"HELO"
                and isinstance(helo[1], dict)):
            raise _Failure("protocol", f"expected HELO, got {_preview(helo)}")
        nonce = _as_bytes(helo[1].get(b"nonce"))
        auth_salt = _as_bytes(helo[1].get(b"auth"))
        if not nonce:
            raise _Failure("protocol", "HELO without a nonce")
        username = self.cfg.username or ""
        password = b""
        if self.cfg.password_file is not None:
            password = _secret(self.cfg.password_file, "password")
        salt = os.urandom(16).hex()
        # One write, and nothing after it until the PONG: Fluent Bit parses the PING from a
        # single read and drops whatever else that read held.
        self._send(conn, build_ping(self._hostname, salt, nonce, key, username, password,
                                    auth_salt))
        pong = self._read_reply(conn, deadline, "PONG", eof_kind="auth",
                                eof_text="receiver closed the connection instead of "
                                         "answering PING (Fluent Bit's answer to a wrong "
                                         "shared_key)" + self._auth_hint())
        if not (isinstance(pong, list) and len(pong) == 5 and pong[0] == b"PONG"):
            raise _Failure("protocol", f"expected PONG, got {_preview(pong)}")
        if pong[1] is not True:
            reason = _as_bytes(pong[2])[:200].decode("utf-8", "replace") or "no reason given"
            raise _Failure("auth", f"receiver rejected the handshake: {reason!r}"
                                   + self._auth_hint(reason))
        server_host = _as_bytes(pong[3])
        if _as_bytes(pong[4]).decode("ascii", "replace") != pong_digest(salt, server_host,
                                                                          nonce, key):
            raise _Failure("auth", "PONG digest mismatch: the receiver does not know our "
                                   "shared_key (or is not the receiver it claims to be)")

    def _auth_hint(self, reason: str = "") -> str:
        """What to check after a refused handshake, from the receiver's reason (if any) and
        whether we sent credentials. Names settings, never their values."""
        key = "sink.forward.shared_key_file"
        users = "sink.forward.username and sink.forward.password_file"
        user_refused = "username/password" in reason  # both peers: "username/password mismatch"
        key_refused = "shared_key" in reason  # Fluentd: "shared_key mismatch"
        if self.cfg.username is None:
            if user_refused:
                return f": the receiver requires users; set {users}"
            check = f"{key} (it must hold the receiver's shared_key)" if key_refused else key
            return f": check {check}; the receiver may also require users: set {users}"
        if user_refused:
            return f": check {users} (the receiver does not accept this user and password)"
        if key_refused:
            return f": check {key} (it must hold the receiver's shared_key)"
        return f": check {key}, {users}"

    def _read_reply(self, conn: _Conn, deadline: float, what: str, *, eof_kind: str,
                    eof_text: str = "") -> Any:
        """The next msgpack object from the receiver, before ``deadline``.

        EOF raises ``_Failure(eof_kind, eof_text)`` (a default text if empty).
        """
        while True:
            try:
                for obj in conn.unpacker:
                    return obj
            except Exception as exc:  # msgpack raises several ValueError subclasses
                raise _Failure("protocol", f"receiver sent bytes that are not msgpack "
                                           f"while waiting for {what}") from exc
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Failure("ack_timeout" if what == "ack" else "protocol",
                               f"no {what} within the timeout")
            try:
                conn.sock.settimeout(remaining)
                data = conn.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                data = b""  # a close with a reset: the same answer as EOF
            except ssl.SSLError as exc:
                raise _Failure("tls", f"TLS error while waiting for {what}: {exc}") from exc
            except OSError as exc:
                raise _Failure("closed", f"connection lost while waiting for {what}: "
                                         f"{oserror_text(exc)}") from exc
            if not data:
                raise _Failure(eof_kind, eof_text or
                               f"receiver closed the connection while we waited for {what}")
            try:
                conn.unpacker.feed(data)
            except msgpack.BufferFull as exc:
                raise _Failure("protocol", f"oversized reply while waiting for {what}") from exc

    def _await_ack(self, conn: _Conn, chunk: bytes) -> None:
        deadline = time.monotonic() + self.cfg.ack_timeout_s
        reply = self._read_reply(conn, deadline, "ack", eof_kind="closed")
        if isinstance(reply, dict) and b"ack" in reply:
            if _as_bytes(reply[b"ack"]) != chunk:
                raise _Failure("ack_mismatch", "ack for another chunk "
                                               f"({_preview(reply[b'ack'])}, expected {chunk!r})")
            return
        if isinstance(reply, list) and reply and reply[0] == b"HELO":
            raise _Failure("auth", "receiver requires shared_key authentication (sent HELO) but "
                                   "sink.forward.shared_key_file is not set")
        raise _Failure("protocol", f"unexpected reply instead of an ack: {_preview(reply)}")

    def _send(self, conn: _Conn, data: bytes) -> None:
        try:
            conn.sock.settimeout(self.cfg.send_timeout_s)
            conn.sock.sendall(data)
        except TimeoutError as exc:
            raise _Failure("send", "write timed out") from exc
        except OSError as exc:
            raise _Failure("send", f"write failed: {oserror_text(exc)}") from exc


def _log_auth_failure(ep: Endpoint, f: StepFailure) -> None:
    """A refused handshake does not fix itself: say so at ERROR (other failures are
    counted, and reported when no receiver is reachable)."""
    if f.kind == "auth":
        log.error("forward authentication failed", extra={"fields": {
            "endpoint": ep.label, "error": str(f)}})


def _secret(path: Path, what: str) -> bytes:
    try:
        return read_secret(path, what)
    except SinkError as exc:
        raise _Failure("auth", str(exc)) from exc






def _as_bytes(v: Any) -> bytes:
    if isinstance(v, bytes):
        return v
    if isinstance(v, str):
        return v.encode()
    return b""


def _preview(v: Any) -> str:
    return repr(v)[:80]

