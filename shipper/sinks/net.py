"""Connection helpers shared by the network sinks (forward, syslog).

One TLS client context builder and the small socket chores both sinks need, so
the two protocols cannot drift apart on how TLS is verified or how a dead idle
connection is recognised.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass

from shipper.config import TLSClientConfig
from shipper.errors import SinkError


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
