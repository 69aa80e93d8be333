"""Tiny traffic agents the :mod:`shipper.lab` runs inside its network namespaces.

Run as ``python -m shipper.lab.agents <agent> ...``; the lab starts them already
inside a namespace (forked from a thread that entered it), from the installed
package, no checkout needed. Only the standard library is used, so an agent
starts in a few tens of milliseconds and works in any namespace.

Agents and their stdout protocol (one line each, flushed):

``server``
    Listens on ``--port`` (TCP or UDP, ``--family`` 4 or 6), prints ``ready``
    once bound, appends ``<peer ip> <peer port>`` to ``--log`` for every TCP
    accept / UDP datagram, plus ``D <peer ip> <peer port> <hex>`` with the
    first data (up to 64 bytes) of each peer, and echoes what it receives.
``client``
    Optionally binds ``--sport``; with ``--wait-go`` prints ``ready`` and waits
    for a line on stdin first (so that several clients start together). Then
    connects (TCP) or sends (UDP), prints ``connected <local port>``, sends the
    payload, reads the echo (bounded), holds the connection ``--hold`` seconds
    and exits. TCP connections are closed with an RST (``SO_LINGER`` 0) so that
    no TIME_WAIT blocks reusing the same source port right away.
``ping``
    Sends ``--count`` ICMP echo requests over a raw socket and prints
    ``answered <n>/<count>``; exit status 0 only if every one was answered.
``flood``
    Sends one UDP datagram per new destination port at ``--rate`` packets/s
    for ``--duration`` seconds (at most ``--max-count`` datagrams), cycling
    through ``--sockets`` source sockets, and prints ``sent <n> <seconds>``.

Every agent has a hard lifetime (``--max-seconds``) and exits when the
process that started it (``--parent-pid``) is gone, so a crashed lab never
leaves traffic running.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import socket
import struct
import sys
import threading
import time
from collections.abc import Sequence

_SOCKET_TIMEOUT_S = 5.0


def _family(value: int) -> socket.AddressFamily:
    return socket.AF_INET6 if value == 6 else socket.AF_INET


def _watchdog(parent_pid: int, max_seconds: float) -> None:
    """Exit the process when its parent dies or its lifetime is over."""

    def watch() -> None:
        deadline = time.monotonic() + max_seconds
        while time.monotonic() < deadline:
            if parent_pid and os.getppid() != parent_pid:
                os._exit(3)
            time.sleep(0.2)
        os._exit(4)

    threading.Thread(target=watch, name="watchdog", daemon=True).start()


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------- server
def _serve(args: argparse.Namespace) -> int:
    fam = _family(args.family)
    any_addr = "::" if args.family == 6 else "0.0.0.0"
    stype = socket.SOCK_STREAM if args.proto == "tcp" else socket.SOCK_DGRAM
    lsock = socket.socket(fam, stype)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if args.family == 6:
        lsock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    lsock.bind((any_addr, args.port))
    log = open(args.log, "a", buffering=1, encoding="ascii")  # noqa: SIM115 - lives as long as we do
    sel = selectors.DefaultSelector()
    lsock.setblocking(False)
    if args.proto == "tcp":
        lsock.listen(1024)
    sel.register(lsock, selectors.EVENT_READ, None)
    logged: set[tuple[str, int]] = set()

    def first_data(peer: tuple[str, int]) -> bool:
        """True the first time data from ``peer`` arrives (bounded memory: 100k peers)."""
        key = (peer[0], peer[1])
        if key in logged or len(logged) >= 100_000:
            return False
        logged.add(key)
        return True

    _say("ready")
    while True:
        for key, _ in sel.select(timeout=1.0):
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            if sock is lsock and args.proto == "tcp":
                try:
                    conn, peer = lsock.accept()
                except BlockingIOError:
                    continue
                log.write(f"{peer[0]} {peer[1]}\n")
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ, peer)
            elif sock is lsock:
                try:
                    data, peer = lsock.recvfrom(65535)
                except BlockingIOError:
                    continue
                log.write(f"{peer[0]} {peer[1]}\n")
                if first_data(peer):
                    log.write(f"D {peer[0]} {peer[1]} {data[:64].hex()}\n")
                # The client may be gone already; the log line is what matters.
                with contextlib.suppress(OSError):
                    lsock.sendto(data, peer)
            else:
                try:
                    data = sock.recv(65535)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""  # RST from a client closing with SO_LINGER 0
                if not data:
                    sel.unregister(sock)
                    sock.close()
                    continue
                peer = key.data
                if first_data(peer):
                    log.write(f"D {peer[0]} {peer[1]} {data[:64].hex()}\n")
                try:
                    sock.sendall(data)
                except OSError:
                    sel.unregister(sock)
                    sock.close()


# --------------------------------------------------------------------- client
def _client(args: argparse.Namespace) -> int:
    fam = _family(args.family)
    stype = socket.SOCK_STREAM if args.proto == "tcp" else socket.SOCK_DGRAM
    sock = socket.socket(fam, stype)
    sock.settimeout(_SOCKET_TIMEOUT_S)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if args.sport:
        sock.bind(("::" if args.family == 6 else "0.0.0.0", args.sport))
    if args.wait_go:
        _say("ready")
        if not sys.stdin.readline():
            return 2  # the lab went away before saying go
    payload = bytes.fromhex(args.payload_hex)
    dst = (args.dst, args.dport)
    if args.proto == "tcp":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.connect(dst)
        _say(f"connected {sock.getsockname()[1]}")
        if payload:
            sock.sendall(payload)
            _read_echo(sock, len(payload))
    else:
        sock.connect(dst)
        sock.send(payload or b"\0")
        _say(f"connected {sock.getsockname()[1]}")
        # No echo (no server, ICMP unreachable) is fine: the flow exists anyway.
        with contextlib.suppress(OSError):
            sock.recv(65535)
    if args.hold > 0:
        time.sleep(args.hold)
    sock.close()
    return 0


def _read_echo(sock: socket.socket, size: int) -> None:
    got = 0
    try:
        while got < size:
            chunk = sock.recv(65535)
            if not chunk:
                return
            got += len(chunk)
    except OSError:
        return


# ---------------------------------------------------------------------- flood
def _flood(args: argparse.Namespace) -> int:
    fam = _family(args.family)
    socks = []
    for _ in range(max(1, args.sockets)):
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.bind(("::" if args.family == 6 else "0.0.0.0", 0))
        socks.append(s)
    payload = b"x"
    first_port, last_port = args.first_port, args.last_port
    nports = last_port - first_port + 1
    limit = min(args.max_count, int(args.rate * args.duration))
    dst = args.dst
    sent = 0
    port_i = 0
    sock_i = 0
    nsocks = len(socks)
    start = time.monotonic()
    end = start + args.duration
    while sent < limit:
        now = time.monotonic()
        if now >= end:
            break
        # At most 1024 per burst, so that a sender behind schedule still stops on time.
        due = min(limit, sent + 1024, int((now - start) * args.rate) + 1)
        if due <= sent:
            # Ahead of schedule: sleep until the next packet is due (at most 1 ms).
            time.sleep(min(0.001, (sent + 1) / args.rate - (now - start)))
            continue
        while sent < due:
            # A full queue or a queued ICMP error: the packet still counts as tried.
            # (try/except, not contextlib.suppress: this is the hot loop.)
            try:  # noqa: SIM105
                socks[sock_i].sendto(payload, (dst, first_port + port_i))
            except (BlockingIOError, ConnectionRefusedError):
                pass
            sent += 1
            port_i += 1
            if port_i == nports:
                port_i = 0
                sock_i = (sock_i + 1) % nsocks
    _say(f"sent {sent} {time.monotonic() - start:.6f}")
    return 0


# ----------------------------------------------------------------------- ping
def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _ping(args: argparse.Namespace) -> int:
    """ICMP echo over a raw socket (no dependency on an installed ``ping``)."""
    v6 = args.family == 6
    proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    sock = socket.socket(_family(args.family), socket.SOCK_RAW, proto)
    echo_request, echo_reply = (128, 129) if v6 else (8, 0)
    ident = os.getpid() & 0xFFFF
    answered = 0
    for seq in range(1, args.count + 1):
        body = struct.pack("!HH", ident, seq) + b"flowlog-lab"
        csum = 0 if v6 else _checksum(struct.pack("!BBH", echo_request, 0, 0) + body)
        # The kernel fills in the ICMPv6 checksum (it needs the pseudo-header).
        sock.sendto(struct.pack("!BBH", echo_request, 0, csum) + body, (args.dst, 0))
        deadline = time.monotonic() + args.wait
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                pkt = sock.recv(65535)
            except TimeoutError:
                break
            icmp = pkt if v6 else pkt[(pkt[0] & 0x0F) * 4:]
            if len(icmp) >= 8 and icmp[0] == echo_reply and struct.unpack(
                    "!HH", icmp[4:8]) == (ident, seq):
                answered += 1
                break
    _say(f"answered {answered}/{args.count}")
    return 0 if answered == args.count else 1


# ----------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser of the agents (one subcommand per agent)."""
    p = argparse.ArgumentParser(prog="python -m shipper.lab.agents")
    p.add_argument("--parent-pid", type=int, default=0, help="exit when this parent is gone")
    p.add_argument("--max-seconds", type=float, default=600.0, help="hard lifetime")
    sub = p.add_subparsers(dest="agent", required=True)

    s = sub.add_parser("server", help="echo server that logs every peer")
    s.add_argument("--proto", choices=["tcp", "udp"], default="tcp")
    s.add_argument("--family", type=int, choices=[4, 6], default=4)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--log", required=True)

    c = sub.add_parser("client", help="one connection (TCP) or datagram exchange (UDP)")
    c.add_argument("--proto", choices=["tcp", "udp"], default="tcp")
    c.add_argument("--family", type=int, choices=[4, 6], default=4)
    c.add_argument("--dst", required=True)
    c.add_argument("--dport", type=int, required=True)
    c.add_argument("--sport", type=int, default=0)
    c.add_argument("--payload-hex", default="")
    c.add_argument("--hold", type=float, default=0.0)
    c.add_argument("--wait-go", action="store_true")

    f = sub.add_parser("flood", help="UDP datagrams, one new destination port each")
    f.add_argument("--family", type=int, choices=[4, 6], default=4)
    f.add_argument("--dst", required=True)
    f.add_argument("--rate", type=float, required=True)
    f.add_argument("--duration", type=float, required=True)
    f.add_argument("--max-count", type=int, default=10_000_000)
    f.add_argument("--sockets", type=int, default=16)
    f.add_argument("--first-port", type=int, default=1024)
    f.add_argument("--last-port", type=int, default=65535)

    g = sub.add_parser("ping", help="ICMP echo requests, one answer awaited each")
    g.add_argument("--family", type=int, choices=[4, 6], default=4)
    g.add_argument("--dst", required=True)
    g.add_argument("--count", type=int, default=1)
    g.add_argument("--wait", type=float, default=2.0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one agent; the exit status is 0 on success."""
    args = build_parser().parse_args(argv)
    _watchdog(args.parent_pid, args.max_seconds)
    agents = {"server": _serve, "client": _client, "flood": _flood, "ping": _ping}
    try:
        return agents[args.agent](args)
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        sys.stderr.write(f"{args.agent}: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
