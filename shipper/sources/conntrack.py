"""The conntrack source: the only module that talks netlink.

* :func:`open_event_socket` subscribes to NEW / UPDATE / DESTROY multicast
  groups of ctnetlink, inside a chosen network namespace, with a large receive
  buffer (SO_RCVBUFFORCE). With ``reliable_destroy`` DESTROY comes on a second
  socket that asks the kernel to retry instead of dropping
  (:class:`ReliableEventSocket`).
* :func:`dump_table` reads the whole table over a separate socket (a dump on
  the event socket would interleave with events).
* :func:`read_sysctls` / :func:`set_sysctls` read and set
  ``net.netfilter.nf_conntrack_{events,acct,timestamp}`` in that namespace.
* :func:`socket_drops` reads the kernel's drop counter of our socket (the
  ``Drops`` column of ``/proc/net/netlink``): after an ENOBUFS the kernel keeps
  dropping silently until the queue drains, so the counter, not the error, says
  how many events were lost.

Namespaces: a socket belongs to the namespace it was created in, for life.
We create it in a short-lived thread that ``setns()``-es into the target
namespace (setns affects only the calling thread), so the rest of the process
stays where it is. The same trick reads per-namespace ``/proc`` files.

The hot path (receive, decode) uses a plain ``socket.socket`` and
:mod:`shipper.sources.decode`; the protocol constants are written out below;
pyroute2 is the reference decoder in the tests only.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from shipper.errors import DecodeError, SourceError
from shipper.record import FlowEvent
from shipper.sources.decode import (
    CTA_STATUS,
    IPCTNL_MSG_CT_GET,
    NFNL_SUBSYS_CTNETLINK,
    LayoutDecoder,
)

# Protocol constants (linux/netlink.h, linux/netfilter/nfnetlink_conntrack.h). Written
# out rather than imported from pyroute2: importing pyroute2 took 0.3-1 s of every
# start-up here (most of a one-shot `dump`), for six numbers.
NETLINK_NETFILTER = 12
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
CTA_STATUS_MASK = 26
IPS_SRC_NAT = 0x10
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_BROADCAST_ERROR = 4
NETLINK_NO_ENOBUFS = 5
SO_RCVBUFFORCE = 33
CLONE_NEWNET = 0x40000000

# ctnetlink multicast groups
GROUPS = {"new": 1, "update": 2, "destroy": 3}

SYSCTLS = ("events", "acct", "timestamp")

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


def netns_path(netns: str | None) -> str | None:
    """Map a namespace name (``/run/netns/NAME``) or path to a path; None stays None."""
    if netns is None or netns == "":
        return None
    if "/" in netns:
        return netns
    return f"/run/netns/{netns}"


def in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """Run ``fn`` with the calling *thread* inside ``netns`` and return its result."""
    path = netns_path(netns)
    if path is None:
        return fn()
    box: dict[str, object] = {}

    def run() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            box["err"] = SourceError(f"network namespace {netns!r}: cannot open {path}: "
                                     f"{exc.strerror}")
            return
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                e = ctypes.get_errno()
                box["err"] = SourceError(f"network namespace {netns!r}: setns failed: "
                                         f"{os.strerror(e)}")
                return
        finally:
            os.close(fd)
        try:
            box["val"] = fn()
        except BaseException as exc:  # handed back to the caller's thread
            box["err"] = exc

    t = threading.Thread(target=run, name="netns", daemon=True)
    t.start()
    t.join()
    if "err" in box:
        raise box["err"]  # type: ignore[misc]
    return box["val"]  # type: ignore[return-value]


def _netlink_socket(rcvbuf: int) -> socket.socket:
    try:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    except OSError as exc:
        raise SourceError(f"cannot open a netfilter netlink socket: {exc.strerror}") from exc
    try:
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
    except PermissionError:
        # Without CAP_NET_ADMIN the buffer is capped at net.core.rmem_max.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.bind((0, 0))
    return s


def _subscribed(rcvbuf: int, events: list[str], reliable: bool) -> socket.socket:
    s = _netlink_socket(rcvbuf)
    try:
        if reliable:
            # A failed delivery now fails the kernel's broadcast (the DESTROY is
            # kept and retried) and never sets ENOBUFS on this socket.
            s.setsockopt(SOL_NETLINK, NETLINK_BROADCAST_ERROR, 1)
            s.setsockopt(SOL_NETLINK, NETLINK_NO_ENOBUFS, 1)
        for ev in events:
            s.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, GROUPS[ev])
    except OSError as exc:
        s.close()
        raise SourceError(
            f"cannot subscribe to conntrack events: {exc.strerror} "
            "(is nf_conntrack_netlink loaded, and do we have CAP_NET_ADMIN?)"
        ) from exc
    s.setblocking(False)
    return s


class ReliableEventSocket:
    """The event socket with reliable DESTROY: two netlink sockets read as one.

    ``main`` carries NEW/UPDATE as usual: on overrun the kernel drops them, sets
    ENOBUFS once and counts each in the socket's drop counter, so that counter
    stays an exact count of lost events (gap records). ``destroy`` carries
    DESTROY only, with NETLINK_BROADCAST_ERROR and NETLINK_NO_ENOBUFS (what
    conntrackd sets for its reliable event mode): when it is full, the kernel
    keeps the dead entry and retries the DESTROY (measured on 6.18: about 50
    failed attempts a second while we did not read, for 30 s without giving up)
    until it fits. Its drop counter therefore counts
    failed *attempts*, not losses; keeping it off ``main`` is what keeps the gap
    accounting exact (see docs/ARCHITECTURE.md, "Reliable DESTROY").

    Duck-types the part of :class:`socket.socket` the pipeline uses:
    ``fileno()`` is an epoll descriptor readable when either socket is,
    ``recv_into`` reads ``main`` first (so a flow's NEW, queued before its
    DESTROY, is read first), ``setsockopt`` (the BPF filter) applies to both,
    ``getsockopt`` reads ``main``.
    """

    def __init__(self, main: socket.socket, destroy: socket.socket) -> None:
        """Take ownership of both sockets."""
        self.main = main
        self.destroy = destroy
        self._ep = select.epoll()
        self._ep.register(main.fileno(), select.EPOLLIN)
        self._ep.register(destroy.fileno(), select.EPOLLIN)

    def fileno(self) -> int:
        """An epoll descriptor, readable when either socket has data."""
        return self._ep.fileno()

    def recv_into(self, buf: bytearray) -> int:
        """One datagram from ``main``, else from ``destroy``; BlockingIOError when both are empty.

        OSError(ENOBUFS) comes only from ``main`` (``destroy`` never reports it).
        """
        try:
            return self.main.recv_into(buf)
        except BlockingIOError:
            return self.destroy.recv_into(buf)

    def setsockopt(self, level: int, name: int, value: int | bytes) -> None:
        """Apply to both sockets; raise the first error after trying both."""
        err: OSError | None = None
        for s in (self.main, self.destroy):
            try:
                s.setsockopt(level, name, value)
            except OSError as exc:
                err = err or exc
        if err is not None:
            raise err

    def getsockopt(self, level: int, name: int) -> int:
        """Read an option of ``main``."""
        return int(self.main.getsockopt(level, name))

    def close(self) -> None:
        """Close both sockets and the epoll descriptor."""
        for c in (self._ep, self.main, self.destroy):
            with contextlib.suppress(OSError):
                c.close()


def open_event_socket(
    netns: str | None, events: list[str], rcvbuf: int, reliable_destroy: bool = False
) -> socket.socket | ReliableEventSocket:
    """Open a non-blocking socket subscribed to the given event types inside ``netns``.

    With ``reliable_destroy`` (and "destroy" in ``events``) return a
    :class:`ReliableEventSocket`: DESTROY on its own retrying socket, the other
    types on an ordinary one, each with ``rcvbuf``.
    """
    if not (reliable_destroy and "destroy" in events):
        return in_netns(netns, lambda: _subscribed(rcvbuf, events, False))
    rest = [e for e in events if e != "destroy"]

    def make() -> ReliableEventSocket:
        main = _subscribed(rcvbuf, rest, False)
        try:
            destroy = _subscribed(rcvbuf, ["destroy"], True)
        except BaseException:
            main.close()
            raise
        return ReliableEventSocket(main, destroy)

    return in_netns(netns, make)


def effective_rcvbuf(sock: socket.socket | ReliableEventSocket) -> int:
    """The receive buffer the kernel granted (it reports twice the requested size)."""
    return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))


def _proc_sys(name: str) -> Path:
    return Path(f"/proc/sys/net/netfilter/nf_conntrack_{name}")


def read_sysctls(netns: str | None) -> dict[str, int | None]:
    """``{events, acct, timestamp}`` in ``netns`` (None where unreadable)."""

    def read() -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for name in SYSCTLS:
            try:
                out[name] = int(_proc_sys(name).read_text().strip())
            except (OSError, ValueError):
                out[name] = None
        return out

    return in_netns(netns, read)


def set_sysctls(netns: str | None, values: dict[str, int]) -> dict[str, str]:
    """Write the given sysctls in ``netns``; return ``{name: error}`` for those that failed."""

    def write() -> dict[str, str]:
        errors: dict[str, str] = {}
        for name, value in values.items():
            try:
                _proc_sys(name).write_text(f"{value}\n")
            except OSError as exc:
                errors[name] = exc.strerror or str(exc)
        return errors

    return in_netns(netns, write)


def socket_drops(netns: str | None, sock: socket.socket | ReliableEventSocket) -> int | None:
    """The kernel's drop counter of ``sock`` (None if it cannot be found).

    For a :class:`ReliableEventSocket` that of its ``main`` socket: the events
    really lost. The ``destroy`` socket's counter counts retried attempts
    (:func:`destroy_retries`).
    """
    if isinstance(sock, ReliableEventSocket):
        sock = sock.main
    return _drops_of(netns, sock)


def destroy_retries(netns: str | None, sock: socket.socket | ReliableEventSocket) -> int | None:
    """Failed DESTROY delivery attempts the kernel retried (reliable DESTROY only, else None)."""
    if not isinstance(sock, ReliableEventSocket):
        return None
    return _drops_of(netns, sock.destroy)


def _drops_of(netns: str | None, sock: socket.socket) -> int | None:
    inode = os.fstat(sock.fileno()).st_ino

    def read() -> int | None:
        path = "/proc/thread-self/net/netlink" if netns_path(netns) else "/proc/self/net/netlink"
        try:
            lines = Path(path).read_text().splitlines()
        except OSError:
            return None
        if not lines:
            return None
        cols = lines[0].split()
        try:
            di, ii = cols.index("Drops"), cols.index("Inode")
        except ValueError:
            return None
        for line in lines[1:]:
            f = line.split()
            if len(f) > max(di, ii) and f[ii] == str(inode):
                return int(f[di])
        return None

    return in_netns(netns, read)


_seq = 0

DUMP_TIMEOUT_S = 30.0


def _dump_request(seq: int, family: int, snat_only: bool) -> bytes:
    """IPCTNL_MSG_CT_GET with NLM_F_DUMP; with ``snat_only`` the kernel keeps only entries
    whose status has IPS_SRC_NAT (CTA_STATUS + CTA_STATUS_MASK, Linux 5.19+)."""
    attrs = b""
    if snat_only:
        for atype in (CTA_STATUS, CTA_STATUS_MASK):
            attrs += struct.pack("=HH", 8, atype) + struct.pack(">I", IPS_SRC_NAT)
    msg_type = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
    return struct.pack("=IHHII", 20 + len(attrs), msg_type, NLM_F_REQUEST | NLM_F_DUMP,
                       seq, 0) + bytes([family, 0, 0, 0]) + attrs


def dump_table(
    netns: str | None,
    decoder: LayoutDecoder,
    rcvbuf: int = 16 * 1024 * 1024,
    on_decode_error: Callable[[DecodeError], None] | None = None,
    *,
    family: int = socket.AF_UNSPEC,
    snat_only: bool = False,
) -> Iterator[FlowEvent]:
    """Yield every conntrack entry (IPv4 and IPv6) as a ``snapshot`` event.

    Dumps are flow-controlled by the kernel (it waits for us), so nothing is
    lost however large the table. Malformed entries are passed to
    ``on_decode_error`` and skipped. ``family`` (AF_INET / AF_INET6) and
    ``snat_only`` (only entries the kernel source-NATed) make the kernel skip
    the other entries before it builds messages for them.

    Raises SourceError if the dump cannot be made, is refused, or stalls.
    """
    events: list[FlowEvent] = []
    decode_dump = decoder.decode_dump

    def scan(buf: bytearray, have: int) -> tuple[int, int | None]:
        return decode_dump(buf, have, time.time_ns(), events, on_decode_error)

    for _run in _dump_reads(netns, rcvbuf, family, snat_only, scan):
        yield from events
        events.clear()


def dump_chunks(
    netns: str | None,
    rcvbuf: int = 16 * 1024 * 1024,
    *,
    family: int = socket.AF_UNSPEC,
    snat_only: bool = False,
) -> Iterator[memoryview]:
    """The same dump as :func:`dump_table`, undecoded: yield each read's run of complete
    messages (entries, and at the end the NLMSG_DONE), a view valid until the next.

    For a dump decoded elsewhere (the one-shot dump's worker processes): only the
    netlink headers are read here, to find the whole messages and the end.
    Raises SourceError as :func:`dump_table` does.
    """
    decode_dump = LayoutDecoder().decode_dump  # with no list: headers only, nothing decoded

    def scan(buf: bytearray, have: int) -> tuple[int, int | None]:
        return decode_dump(buf, have, 0, None)

    yield from _dump_reads(netns, rcvbuf, family, snat_only, scan)


def _dump_reads(
    netns: str | None,
    rcvbuf: int,
    family: int,
    snat_only: bool,
    scan: Callable[[bytearray, int], tuple[int, int | None]],
) -> Iterator[memoryview]:
    """Request a dump and read it: after each read ``scan(buf, have)`` returns where the
    complete messages end and whether the dump ended (None: it goes on; 0: NLMSG_DONE;
    an errno: refused); yield a view of those messages (valid until the next read)."""
    global _seq
    _seq += 1
    seq = _seq
    sock = in_netns(netns, lambda: _netlink_socket(rcvbuf))
    try:
        try:
            sock.sendto(_dump_request(seq, family, snat_only), (0, 0))
        except OSError as exc:
            raise SourceError(f"conntrack dump request failed: {exc.strerror}") from exc
        # The kernel fills at most 32 KB per read; the room left over keeps a message
        # cut at a read boundary (never, in practice: the kernel sends whole messages).
        buf = bytearray(1 << 17)
        view = memoryview(buf)
        sock.settimeout(DUMP_TIMEOUT_S)
        have = 0
        while True:
            try:
                n = sock.recv_into(view[have:])
            except TimeoutError as exc:
                raise SourceError(f"conntrack dump timed out after {DUMP_TIMEOUT_S:g} s"
                                  ) from exc
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    raise SourceError("conntrack dump overran its buffer") from exc
                raise SourceError(f"conntrack dump failed: {exc.strerror}") from exc
            if n == 0:
                raise SourceError("conntrack dump: the socket closed before the end")
            have += n
            try:
                off, end = scan(buf, have)
            except DecodeError as exc:
                raise SourceError(f"conntrack dump: {exc}") from exc
            off = min(off, have)
            yield view[:off]
            if end is not None:
                if end:
                    raise SourceError(f"conntrack dump refused: {os.strerror(end)}")
                return
            if off:
                buf[:have - off] = buf[off:have]
                have -= off
            if len(buf) - have < 1 << 16:
                raise SourceError("conntrack dump: a message larger than 64 KB")
    finally:
        sock.close()
