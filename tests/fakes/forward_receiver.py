"""A forward-protocol (v1) receiver for tests: msgpack over TCP on 127.0.0.1, port 0.

It decodes Message, Forward, PackedForward and CompressedPackedForward, keeps
every entry it accepted (in arrival order, across restarts) and answers
``{"ack": chunk}`` - or misbehaves on purpose, per ``mode``:

* ``ack``              ingest, ack (the default)
* ``ack_late``         ingest, ack after ``ack_delay_s``
* ``never_ack``        ingest, never ack
* ``drop_mid_batch``   read part of a message, then close the connection (nothing ingested)
* ``drop_after_ingest`` ingest, then close without ack (the sender's retry duplicates)
* ``garbage``          answer bytes that are not msgpack instead of an ack
* ``wrong_ack``        ack with a chunk id that was never sent

``fail_next(n, mode)`` applies a mode to the next ``n`` messages only. ``tls`` takes a
server ``ssl.SSLContext``.

With ``shared_key`` (and optionally ``users``: name -> password) the server runs the
HELO/PING/PONG handshake first, exactly as the real peer of ``profile`` does. Each
profile was read from the peer's source (and, for Fluent Bit, checked against a real
5.1 receiver: ``/work/shared/FACTS.md``, "shared_key handshake"):

``fluent-bit-5``  (``plugins/in_forward/fw_prot.c``, ``fw_conn.c``, v5.1.1)
    HELO ``["HELO", {"nonce": str16, "auth": str16}]``: two keys, no ``keepalive``;
    nonce and the user-auth salt are 16 random bytes packed as msgpack *str*, the salt
    sent whether or not users are configured. The PING must arrive in one read (a partial
    PING closes the connection) and whatever else that read held is dropped; it must be an
    array of 6 str. A wrong shared_key, or a malformed PING: no PONG, the connection is
    closed (EOF). A wrong user or password: ``["PONG", false, "username/password
    mismatch", "", ""]``, then close. Success: ``["PONG", true, "", self_hostname,
    sha512_hex(salt + self_hostname + nonce + key)]``; self_hostname defaults to
    ``localhost``. ``users`` without a shared_key is a start-up error in Fluent Bit.
``fluentd-1``  (``lib/fluent/plugin/in_forward.rb``, unchanged since 2016, so all of 1.x)
    HELO ``["HELO", {"nonce": bin16, "auth": bin16, "keepalive": true}]``: Ruby's
    ``SecureRandom.random_bytes`` are ASCII-8BIT strings, which msgpack-ruby packs as
    *bin*; the ``auth`` salt is sent whenever ``<security>`` is on, users or not (only
    ``user_auth true`` makes it check them). PINGs are read from the stream (data after
    the PING is processed normally); a PING that is not 6 elements starting with "PING"
    gets ``["PONG", false, "invalid ping message", "", ""]``, a wrong key ``"shared_key
    mismatch"``, a wrong user ``"username/password mismatch"``; the connection is closed
    after that PONG. Success as above.

Typical use::

    rx = ForwardReceiver().start()
    ... send to ("127.0.0.1", rx.port) ...
    rx.wait_records(100, timeout=10)
    rx.stop(); rx.start()   # same port, records kept
    rx.close()
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from shipper.sinks.forward_format import decode_message, unpacker

PROFILES = ("fluent-bit-5", "fluentd-1")

MODES = (
    "ack",
    "ack_late",
    "never_ack",
    "drop_mid_batch",
    "drop_after_ingest",
    "garbage",
    "wrong_ack",
)


@dataclass(frozen=True, slots=True)
class Received:
    """One entry as accepted: tag, event time in ns, record."""

    tag: str
    time_ns: int
    record: dict[str, Any]


@dataclass(slots=True)
class _Stats:
    connections: int = 0
    messages: int = 0
    acks: int = 0
    handshakes_ok: int = 0
    handshakes_failed: int = 0
    helos: list[tuple[bytes, bytes]] = field(default_factory=list)  # (nonce, auth) sent
    pings: list[list[Any]] = field(default_factory=list)  # every PING received, decoded
    chunks: list[str] = field(default_factory=list)


def _sha512_hex(*parts: bytes) -> str:
    h = hashlib.sha512()
    for p in parts:
        h.update(p)
    return h.hexdigest()


class ForwardReceiver:
    """Threaded fake Fluentd/Fluent Bit forward input. See the module docstring."""

    def __init__(
        self,
        *,
        mode: str = "ack",
        ack_delay_s: float = 0.0,
        profile: str = "fluent-bit-5",
        shared_key: bytes | None = None,
        users: dict[str, bytes] | None = None,
        server_hostname: str | None = None,
        wrong_pong_digest: bool = False,
        tls: ssl.SSLContext | None = None,
        port: int = 0,
        keep_records: bool = True,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}")
        if users and shared_key is None:
            # Fluent Bit refuses to start ("security.users is set but no shared_key");
            # Fluentd's <security> requires shared_key.
            raise ValueError("users need a shared_key")
        self.mode = mode
        self.ack_delay_s = ack_delay_s
        self.profile = profile
        self.shared_key = shared_key
        self.users = dict(users or {})
        default_host = "localhost" if profile == "fluent-bit-5" else "fake-fluentd"
        self.server_hostname = server_hostname or default_host
        self.wrong_pong_digest = wrong_pong_digest
        self.tls = tls
        self.port = port
        self.keep_records = keep_records  # False: count entries only (benchmarks)
        self.count = 0  # entries accepted, duplicates included
        self.stats = _Stats()
        self.errors: list[str] = []  # protocol errors seen (for assertions)
        self._records: list[Received] = []
        self._cond = threading.Condition()
        self._fail: list[tuple[int, str]] = []  # [remaining, mode]
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._running = False

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> ForwardReceiver:
        """Listen (on the same port as before after a ``stop``); return self."""
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(64)
        self.port = s.getsockname()[1]
        self._listener = s
        self._running = True
        self._accept_thread = threading.Thread(target=self._accept, name="fwd-rx-accept",
                                               daemon=True)
        self._accept_thread.start()
        return self

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Close the listener and every connection (like a receiver crash); records are kept."""
        self._running = False
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._cond:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        if self._accept_thread is not None:
            self._accept_thread.join(5)
            self._accept_thread = None
        for t in self._threads:
            t.join(5)
        self._threads = []

    def close(self) -> None:
        """Stop for good."""
        self.stop()

    def __enter__(self) -> ForwardReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- behaviour and results --------------------------------------------------------

    def fail_next(self, n: int, mode: str) -> None:
        """Handle the next ``n`` messages in ``mode``, then go back to ``self.mode``."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        with self._cond:
            self._fail.append((n, mode))

    def records(self) -> list[Received]:
        """Every accepted entry so far, in arrival order (duplicates included)."""
        with self._cond:
            return list(self._records)

    def clear(self) -> None:
        """Forget the records received so far."""
        with self._cond:
            self._records.clear()
            self.count = 0

    def wait_records(self, n: int, timeout: float = 10.0) -> list[Received]:
        """Wait until at least ``n`` entries arrived (bounded); return them all.

        Raises TimeoutError with what did arrive if the deadline passes.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.count < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.count} of {n} records after {timeout}s; "
                                       f"errors: {self.errors[-3:]}")
                self._cond.wait(left)
            return list(self._records)

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> None:
        """Wait until ``predicate(self)`` is true (bounded poll); TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() >= deadline:
                raise TimeoutError("condition not met in time")
            with self._cond:
                self._cond.wait(0.02)

    # --- server -----------------------------------------------------------------------

    def _accept(self) -> None:
        listener = self._listener
        assert listener is not None
        while self._running:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with self._cond:
                self._conns.add(conn)
                self.stats.connections += 1
            t = threading.Thread(target=self._serve, args=(conn,), name="fwd-rx-conn",
                                 daemon=True)
            self._threads.append(t)
            t.start()

    def _next_mode(self) -> str:
        with self._cond:
            if self._fail:
                n, mode = self._fail[0]
                if n <= 1:
                    self._fail.pop(0)
                else:
                    self._fail[0] = (n - 1, mode)
                return mode
            return self.mode

    def _serve(self, raw: socket.socket) -> None:
        sock = raw
        try:
            raw.settimeout(10)
            if self.tls is not None:
                try:
                    sock = self.tls.wrap_socket(raw, server_side=True)
                except (ssl.SSLError, OSError) as exc:
                    self._error(f"tls: {exc}")
                    return
                with self._cond:
                    self._conns.add(sock)
            sock.settimeout(None)
            pending = b""  # bytes after the PING that the peer treats as data
            if self.shared_key is not None:
                if self.profile == "fluent-bit-5":
                    ok = self._handshake_fluent_bit(sock)
                else:
                    ok, pending = self._handshake_fluentd(sock)
                if not ok:
                    return
            self._loop(sock, pending)
        except OSError:
            pass  # the sender went away: nothing to report
        finally:
            with self._cond:
                self._conns.discard(raw)
                self._conns.discard(sock)
            with contextlib.suppress(OSError):
                sock.close()

    def _recv(self, sock: socket.socket, size: int = 65536) -> bytes:
        try:
            return sock.recv(size)
        except OSError:
            return b""

    # --- the handshake, per profile (see the module docstring) -------------------------

    def _send_helo(self, sock: socket.socket) -> tuple[bytes, bytes]:
        # Both peers: 16 random bytes each for the nonce and the user-auth salt.
        nonce, auth_salt = os.urandom(16), os.urandom(16)
        with self._cond:
            self.stats.helos.append((nonce, auth_salt))
        sock.sendall(self.helo(nonce, auth_salt))
        return nonce, auth_salt

    def helo(self, nonce: bytes, auth_salt: bytes) -> bytes:
        """The HELO bytes this profile sends for ``nonce`` and ``auth_salt``."""
        if self.profile == "fluent-bit-5":
            # msgpack_pack_str(16) + the raw bytes: str type, not bin, and no keepalive.
            return msgpack.packb(["HELO", {"nonce": nonce, "auth": auth_salt}],
                                 use_bin_type=False)
        return msgpack.packb(["HELO", {"nonce": nonce, "auth": auth_salt, "keepalive": True}],
                             use_bin_type=True)

    def _pong_ok(self, salt: bytes, nonce: bytes) -> bytes:
        key = b"not-the-key" if self.wrong_pong_digest else self.shared_key
        assert key is not None
        host = self.server_hostname
        return msgpack.packb(["PONG", True, "", host,
                              _sha512_hex(salt, host.encode(), nonce, key)])

    def _check_ping(self, ping: Any, nonce: bytes, auth_salt: bytes) -> str:
        """"" if ``ping`` (decoded with str -> surrogate-escaped str) passes, else the reason
        Fluentd would give. Key first, then users - the order of both peers' check_ping."""
        key = self.shared_key
        assert key is not None
        with self._cond:
            self.stats.pings.append(ping if isinstance(ping, list) else [ping])
        if not (isinstance(ping, list) and len(ping) == 6 and _raw(ping[0]) == b"PING"):
            return "invalid ping message"
        _, hostname, salt, digest, username, pw_digest = (_raw(x) for x in ping)
        if digest != _sha512_hex(salt, hostname, nonce, key).encode():
            return "shared_key mismatch"
        if self.users:
            password = self.users.get(username.decode("utf-8", "surrogateescape"))
            if password is None or pw_digest != _sha512_hex(auth_salt, username,
                                                            password).encode():
                return "username/password mismatch"
        return ""

    def _handshake_fluent_bit(self, sock: socket.socket) -> bool:
        nonce, auth_salt = self._send_helo(sock)
        # secure_forward_read: one read into a 1024-byte buffer; anything but one complete
        # msgpack object in it is an error, and bytes after the PING are never looked at.
        data = self._recv(sock, 1023)
        u = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape")
        u.feed(data)
        try:
            ping = u.unpack()
        except Exception:  # OutOfData (partial PING) or garbage: close, like Fluent Bit
            self._handshake_failed(f"fluent-bit-5: no complete PING in one read "
                                   f"({len(data)} bytes)")
            return False
        if not (isinstance(ping, list) and len(ping) == 6
                and all(isinstance(x, str) for x in ping)):
            with self._cond:
                self.stats.pings.append(ping if isinstance(ping, list) else [ping])
            self._handshake_failed(f"fluent-bit-5: invalid PING {ping!r:.80}")
            return False
        reason = self._check_ping(ping, nonce, auth_salt)
        if reason == "shared_key mismatch" or reason == "invalid ping message":
            self._handshake_failed(f"fluent-bit-5: {reason}")  # no PONG: just close
            return False
        if reason:  # check_ping returned -2: a refusal PONG, then close
            # Counted before sending: the sender may check right after reading it.
            self._handshake_failed(f"fluent-bit-5: {reason}")
            sock.sendall(msgpack.packb(["PONG", False, "username/password mismatch", "", ""]))
            return False
        with self._cond:
            self.stats.handshakes_ok += 1  # before the PONG: the sender may check right after
        sock.sendall(self._pong_ok(_raw(ping[2]), nonce))
        return True

    def _handshake_fluentd(self, sock: socket.socket) -> tuple[bool, bytes]:
        """(passed, the bytes that followed the PING in the stream: data to handle)."""
        nonce, auth_salt = self._send_helo(sock)
        # msgpack-ruby gives str and bin both as String: decode str leniently.
        pu = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape")
        buf = b""
        while True:
            data = self._recv(sock)
            if not data:
                return False, b""
            buf += data
            pu.feed(data)
            try:
                ping = pu.unpack()
            except msgpack.OutOfData:
                continue
            except Exception:
                self._handshake_failed("fluentd-1: undecodable PING")
                return False, b""
            break
        reason = self._check_ping(ping, nonce, auth_salt)
        if reason:
            self._handshake_failed(f"fluentd-1: {reason}")  # before the PONG, as above
            sock.sendall(msgpack.packb(["PONG", False, reason, "", ""]))
            return False, b""  # close_after_write_complete
        with self._cond:
            self.stats.handshakes_ok += 1  # before the PONG: the sender may check right after
        sock.sendall(self._pong_ok(_raw(ping[2]), nonce))
        return True, buf[pu.tell():]

    def _handshake_failed(self, text: str) -> None:
        with self._cond:
            self.stats.handshakes_failed += 1
            self.errors.append(text)
            self._cond.notify_all()

    def _loop(self, sock: socket.socket, pending: bytes = b"") -> None:
        u = unpacker()
        fed = 0
        mode: str | None = None  # the mode of the message whose bytes are arriving
        while self._running:
            data, pending = (pending, b"") if pending else (self._recv(sock), b"")
            if not data:
                return
            fed += len(data)
            if mode is None:
                mode = self._next_mode()
            if mode == "drop_mid_batch":
                return  # part of a message read: hang up, ingest nothing
            u.feed(data)
            while True:
                try:
                    msg = u.unpack()
                except msgpack.OutOfData:
                    break
                except Exception as exc:
                    self._error(f"undecodable bytes: {exc}")
                    return
                if mode is None:
                    mode = self._next_mode()
                    if mode == "drop_mid_batch":
                        return
                if not self._handle(sock, msg, mode):
                    return
                mode = None
            if mode is None and fed > u.tell():  # the next message has begun
                mode = self._next_mode()
                if mode == "drop_mid_batch":
                    return

    def _handle(self, sock: socket.socket, msg: Any, mode: str) -> bool:
        try:
            if self.keep_records:
                tag, entries, opts = decode_message(msg)
                n = len(entries)
            else:
                n, opts = _count_entries(msg)
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            self._error(f"bad message: {exc}")
            return False
        with self._cond:
            self.stats.messages += 1
            self.count += n
            if self.keep_records:
                self._records.extend(Received(tag, t, r) for t, r in entries)
            chunk = opts.get("chunk")
            if chunk is not None:
                self.stats.chunks.append(chunk)
            self._cond.notify_all()
        if mode == "drop_after_ingest":
            return False
        if chunk is None or mode == "never_ack":
            return True
        if mode == "garbage":
            sock.sendall(b"\xc1\xc1 this is not msgpack \xc1")
            return True
        if mode == "ack_late" and self.ack_delay_s > 0:
            time.sleep(self.ack_delay_s)  # the fake's injected delay, not a test wait
        ack = "not-a-chunk-we-got" if mode == "wrong_ack" else chunk
        with self._cond:
            self.stats.acks += 1  # counted before sending: the sender may check right after
        try:
            sock.sendall(msgpack.packb({"ack": ack}))
        except OSError:
            return False
        return True

    def _error(self, text: str) -> None:
        with self._cond:
            self.errors.append(text)
            self._cond.notify_all()


def _raw(v: Any) -> bytes:
    """A PING element back to the bytes that were sent (str decoded with surrogateescape)."""
    if isinstance(v, str):
        return v.encode("utf-8", "surrogateescape")
    if isinstance(v, bytes):
        return v
    return repr(v).encode()


def _count_entries(msg: Any) -> tuple[int, dict[str, Any]]:
    """Entries in a message without decoding records (``keep_records=False``)."""
    if not isinstance(msg, list) or len(msg) < 2:
        raise ValueError("not a forward message")
    if isinstance(msg[1], list):
        return len(msg[1]), (msg[2] if len(msg) > 2 else {})
    if isinstance(msg[1], bytes):
        opts = msg[2] if len(msg) > 2 else {}
        return int(opts["size"]), opts
    return 1, (msg[3] if len(msg) > 3 else {})
