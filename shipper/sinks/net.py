"""Connection helpers shared by the network sinks (forward, syslog).

One TLS client context builder, the small socket chores both sinks need and
:class:`Connections`, the one open connection with failover across the
configured receivers, so the two protocols cannot drift apart on how TLS is
verified, how a dead idle connection is recognised, in which order receivers
are tried, or what is counted and logged when a step fails.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from shipper.config import TLSClientConfig
from shipper.errors import SinkError

if TYPE_CHECKING:
    from shipper.metrics import Metrics


def build_ssl_context(tls: TLSClientConfig) -> ssl.SSLContext:
    """A client context: TLS >= 1.2, verification on unless ``tls.verify`` is false."""
    try:
        if tls.verify:
            ctx = ssl.create_default_context(
                cafile=str(tls.ca_file) if tls.ca_file is not None else None
            )
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if tls.cert_file is not None:
            ctx.load_cert_chain(
                str(tls.cert_file), str(tls.key_file) if tls.key_file is not None else None
            )
    except (OSError, ssl.SSLError) as exc:
        raise SinkError(f"cannot load TLS files: {exc}", retriable=False) from exc
    return ctx


def stale(sock: socket.socket) -> bool:
    """True if an idle connection was closed by the peer (or sent something unexpected).

    Either way the caller starts afresh: EOF, a RELP ``serverclose``, or a byte
    nobody asked for all mean the connection cannot be trusted for the next batch.
    """
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    if not readable:
        return False
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        sock.recv(1)
    except (BlockingIOError, ssl.SSLWantReadError):
        return False  # only TLS records (e.g. session tickets)
    except OSError:
        return True
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(timeout)
    return True


def close_quietly(sock: socket.socket) -> None:
    """Shut down and close ``sock``, ignoring errors (it may already be dead)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


def oserror_text(exc: OSError) -> str:
    """A short human text for a socket error (strerror, else the message or type)."""
    if exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class StepFailure(Exception):
    """One failed step of a connection (connect, tls, handshake, send, ...).

    ``kind`` is the step, used as the ``error`` label of the sink's error metric.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def open_connection(
    host: str, port: int, timeout: float, tls: ssl.SSLContext | None, server_name: str | None
) -> socket.socket:
    """A connected TCP socket (Nagle off), wrapped in TLS when ``tls`` is given.

    Raises :class:`StepFailure` of kind ``connect`` or ``tls`` with a message that
    says what failed (for TLS verification: the server name checked and why).
    """
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise StepFailure("connect", f"connect failed: {oserror_text(exc)}") from exc
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is None:
            return raw
        name = server_name or host
        try:
            return tls.wrap_socket(raw, server_hostname=name)
        except ssl.SSLCertVerificationError as exc:
            raise StepFailure("tls", f"TLS certificate verification failed "
                                     f"(server name {name!r}): {exc.verify_message}") from exc
        except ssl.SSLError as exc:
            raise StepFailure("tls", f"TLS handshake failed: {exc.reason or exc}") from exc
        except OSError as exc:
            raise StepFailure("tls", f"TLS handshake failed: {oserror_text(exc)}") from exc
    except BaseException:
        close_quietly(raw)
        raise


@dataclass(slots=True)
class Endpoint:
    """One receiver address, and until when it is cooling down after a failure."""

    host: str
    port: int
    label: str
    down_until: float = 0.0


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> ``(host, port)``; ValueError if malformed."""
    host, sep, port = address.rpartition(":")
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host, int(port)


def endpoints(addresses: Iterable[str]) -> list[Endpoint]:
    """The configured receivers, in order; a malformed address is a non-retriable SinkError."""
    out = []
    for a in addresses:
        try:
            host, port = parse_address(a)
        except ValueError as exc:
            raise SinkError(str(exc), retriable=False) from exc
        out.append(Endpoint(host, port, f"{host}:{port}"))
    return out


def failover_order(eps: list[Endpoint], now: float) -> list[Endpoint]:
    """Healthy endpoints in configured order, then cooling ones, soonest back first."""
    healthy = [e for e in eps if e.down_until <= now]
    cooling = sorted((e for e in eps if e.down_until > now), key=lambda e: e.down_until)
    return healthy + cooling


class Conn(Protocol):
    """What :class:`Connections` needs of a sink's connection object."""

    sock: socket.socket
    endpoint: Endpoint


C = TypeVar("C", bound=Conn)


class Connections(Generic[C]):
    """The one open connection of a network sink, with failover across its receivers.

    :meth:`get` returns the open connection, or (when there is none, or the
    receiver closed it while idle) opens one, trying the receivers in
    :func:`failover_order`; a receiver whose step failed cools down for
    ``cooldown_s``. Every failed step is counted in
    ``shipper_<sink>_errors_total{endpoint, error}``, every connection in
    ``shipper_<sink>_connections_total`` and ``shipper_<sink>_connected``.

    The sink supplies the protocol: ``open(endpoint)`` connects and runs its
    handshake (raising :class:`StepFailure`), ``before_close(conn, broken)`` (optional)
    settles what the connection still held before its socket closes (``broken``: the
    peer broke it), ``connected_fields()`` adds the sink's fields to the "connected"
    log line, ``on_failure(endpoint, failure)`` (optional) adds the sink's own report
    of a failed step.

    Threading: :meth:`get`, :meth:`fail` and :meth:`drop` run on the delivery
    worker; :meth:`abort` and :meth:`take` may come from another thread (shutdown).
    """

    def __init__(
        self,
        sink: str,
        addresses: Iterable[str],
        *,
        metrics: Metrics,
        log: logging.Logger,
        cooldown_s: float,
        clock: Callable[[], float],
        open: Callable[[Endpoint], C],
        connected_fields: Callable[[], dict[str, Any]],
        before_close: Callable[[C, bool], None] | None = None,
        on_failure: Callable[[Endpoint, StepFailure], None] | None = None,
    ) -> None:
        self.sink = sink
        self.endpoints = endpoints(addresses)
        self.metrics = metrics
        self._log = log
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._open = open
        self._connected_fields = connected_fields
        self._before_close = before_close
        self._on_failure = on_failure
        self.current: C | None = None
        self._lock = threading.Lock()  # guards current/aborted against abort() and take()
        self.aborted = False
        for ep in self.endpoints:
            metrics.set(f"shipper_{sink}_connected", 0, ep.label)

    def get(self) -> C:
        """The open connection, or a new one; SinkError(retriable) if no receiver can be
        reached (each one's failure named) or the sink is shutting down."""
        with self._lock:
            if self.aborted:
                raise SinkError(f"{self.sink} sink is shutting down", retriable=True)
            conn = self.current
        if conn is not None:
            if not stale(conn.sock):
                return conn
            self.drop(conn, broken=True)
            self._log.info(f"{self.sink} connection closed by receiver, reconnecting",
                           extra={"fields": {"endpoint": conn.endpoint.label}})
        problems = []
        for ep in failover_order(self.endpoints, self._clock()):
            try:
                conn = self._open(ep)
            except StepFailure as f:
                self._step_failed(ep, f)
                problems.append(f"{ep.label}: {f}")
                continue
            with self._lock:
                if self.aborted:
                    self._close(conn, broken=False)
                    raise SinkError(f"{self.sink} sink is shutting down", retriable=True)
                self.current = conn
            self.metrics.inc(f"shipper_{self.sink}_connections_total", ep.label)
            self.metrics.set(f"shipper_{self.sink}_connected", 1, ep.label)
            self._log.info(f"{self.sink} connected", extra={"fields": {
                "endpoint": ep.label, **self._connected_fields()}})
            return conn
        raise SinkError(f"no {self.sink} receiver reachable: " + "; ".join(problems),
                        retriable=True)

    def fail(self, conn: C, f: StepFailure) -> None:
        """A step on ``conn`` failed: count it, cool its receiver down, drop the connection
        (broken by the peer when the failure is of kind ``closed``)."""
        self._step_failed(conn.endpoint, f)
        self.drop(conn, broken=f.kind == "closed")

    def drop(self, conn: C, *, broken: bool) -> None:
        """Forget ``conn`` (if it is the current one) and close it."""
        with self._lock:
            if self.current is conn:
                self.current = None
        self._close(conn, broken=broken)

    def abort(self) -> None:
        """Interrupt a blocked step from another thread: no new connection is opened."""
        with self._lock:
            self.aborted = True
            if self.current is not None:
                with contextlib.suppress(OSError):
                    self.current.sock.shutdown(socket.SHUT_RDWR)

    def take(self) -> tuple[C | None, bool]:
        """Detach the current connection for the sink to close (with :meth:`close`), and
        whether the sink was aborted."""
        with self._lock:
            conn, self.current = self.current, None
            return conn, self.aborted

    def close(self, conn: C, *, broken: bool) -> None:
        """Close a connection detached by :meth:`take`."""
        self._close(conn, broken=broken)

    def _close(self, conn: C, *, broken: bool) -> None:
        if self._before_close is not None:
            self._before_close(conn, broken)
        close_quietly(conn.sock)
        self.metrics.set(f"shipper_{self.sink}_connected", 0, conn.endpoint.label)

    def _step_failed(self, ep: Endpoint, f: StepFailure) -> None:
        self.metrics.inc(f"shipper_{self.sink}_errors_total", ep.label, f.kind)
        ep.down_until = self._clock() + self._cooldown_s
        if self._on_failure is not None:
            self._on_failure(ep, f)
