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
from pathlib import Path
from typing import Protocol

from shipper.errors import SinkError


class TLSSettings(Protocol):
    """What a sink's TLS config section provides (ForwardTLSConfig, SyslogTLSConfig)."""

    @property
    def verify(self) -> bool: ...
    @property
    def ca_file(self) -> Path | None: ...
    @property
    def cert_file(self) -> Path | None: ...
    @property
    def key_file(self) -> Path | None: ...


def build_ssl_context(tls: TLSSettings) -> ssl.SSLContext:
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
