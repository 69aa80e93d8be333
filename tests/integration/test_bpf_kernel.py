"""The conntrack BPF pre-filter on the real kernel (lab namespaces, MASQUERADE, DNAT).

Each test builds its own lab and opens two event sockets in its gateway: one
with the filter, one without (the control, proving that the flows the filter
must drop really produced events). Only loopback-free lab traffic is made;
the lab removes every namespace (and so every socket's namespace, rule and
process) at the end, also on failure.
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
import select
import socket
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from shipper.lab import Lab
from shipper.record import FlowEvent
from shipper.sources import bpf, conntrack
from shipper.sources.decode import LayoutDecoder, iter_messages
from tests.integration.harness import event_socket

pytestmark = pytest.mark.kernel  # root only; in CI a skip fails (tests/conftest.py)

TCP, UDP, ICMP, ICMP6 = 6, 17, 1, 58
DNAT_PORT = 9999

# A client for flows that do not come from pods: argv = dst port protos.
CLIENT = r"""
import socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
for proto in sys.argv[3].split(","):
    s = socket.socket(fam, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    s.settimeout(1.0)
    try:
        if proto == "tcp":
            s.connect((sys.argv[1], int(sys.argv[2])))
        else:
            s.sendto(b"x", (sys.argv[1], int(sys.argv[2])))
    except OSError:
        pass
    s.close()
"""


def addr(ev: FlowEvent) -> str:
    """The original source of ``ev`` as text."""
    ip = ev.orig_src
    assert ip is not None
    return str(ipaddress.IPv4Address(ip) if ev.family == 4 else ipaddress.IPv6Address(ip))


class Reader:
    """Reads one event socket with bounded polls, decoding with LayoutDecoder."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.dec = LayoutDecoder()
        self.events: list[FlowEvent] = []
        self.buf = bytearray(1 << 20)

    def poll(self, timeout: float) -> None:
        """Read whatever arrives within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([self.sock], [], [], left)[0]:
                return
            self.drain()

    def drain(self) -> int:
        """Read every queued message now; return how many."""
        n_msgs = 0
        while True:
            try:
                n = self.sock.recv_into(self.buf)
            except BlockingIOError:
                return n_msgs
            for off, _l, _t in iter_messages(self.buf, n):
                ev, _ = self.dec.decode(self.buf, off, 0)
                n_msgs += 1
                if ev is not None:
                    self.events.append(ev)

    def attach(self, program: list[bpf.Insn]) -> None:
        """Attach ``program``, then discard what was queued before it judged anything
        (events from before the attach were never filtered)."""
        bpf.attach(self.sock, program)
        self.drain()
        self.events.clear()

    def wait_for(self, want: Callable[[list[FlowEvent]], bool], timeout: float) -> bool:
        """Poll until ``want(events)`` or ``timeout``; then read stragglers for 0.5 s."""
        deadline = time.monotonic() + timeout
        while not want(self.events) and time.monotonic() < deadline:
            self.poll(0.1)
        self.poll(0.5)
        return want(self.events)

    def new_flows(self) -> set[tuple[str, int]]:
        """``(original source, protocol)`` of every NEW event so far."""
        return {(addr(e), e.proto or 0) for e in self.events if e.action == "new"}


@pytest.fixture
def lab(lab: Lab) -> Lab:
    """The shared lab (tests/conftest.py), plus conntrack events on and a DNAT to pod 0."""
    built = lab
    conntrack.set_sysctls(built.gw, {"events": 1})
    for fam in (4, 6):
        tool = "iptables" if fam == 4 else "ip6tables"
        pod0 = built.pod_ip(0, fam) if fam == 4 else f"[{built.pod_ip(0, fam)}]"
        for proto in ("tcp", "udp"):
            # ext -> node:9999 is DNATed to pod 0: the REPLY tuple's source
            # is then pod 0's address, the ORIGINAL source is the ext host.
            built.run(built.gw, tool, "-w", "-t", "nat", "-A", "PREROUTING", "-i",
                      built.ext_link, "-p", proto, "--dport", str(DNAT_PORT), "-j", "DNAT",
                      "--to-destination", f"{pod0}:8080")
    return built


@pytest.fixture
def sockets(lab: Lab) -> Iterator[tuple[Reader, Reader]]:
    filtered = event_socket(lab)
    control = event_socket(lab)
    try:
        yield Reader(filtered), Reader(control)
    finally:
        filtered.close()
        control.close()


def pod_flows(lab: Lab, pods: list[int]) -> set[tuple[str, int]]:
    """TCP, UDP and ICMP over v4 and v6 from each pod; return the expected NEW flows."""
    want = set()
    for p in pods:
        for fam in (4, 6):
            lab.connect(p, "tcp", fam, dport=8080)
            lab.connect(p, "udp", fam, dport=8081)
            lab.ping(p, fam)
            ip = lab.pod_ip(p, fam)
            want |= {(ip, TCP), (ip, UDP), (ip, ICMP if fam == 4 else ICMP6)}
    return want


def other_flows(lab: Lab) -> set[tuple[str, int]]:
    """Flows not from pods, with pod addresses elsewhere in the tuples.

    gw -> ext (the node's own traffic); gw -> pod 0 (a pod address as the
    original destination and reply source; the source is the bridge address
    10.244.0.1, inside the pod /24 but outside the filter's /32); ext -> node
    DNATed to pod 0 (pod 0 as the reply source). Returns their NEW flows.
    """
    for fam in (4, 6):
        lab.run(lab.gw, sys.executable, "-c", CLIENT, lab.ext_ip(fam), "8080", "tcp,udp")
        lab.run(lab.gw, sys.executable, "-c", CLIENT, lab.pod_ip(0, fam), "7", "tcp,udp")
        lab.run(lab.ext, sys.executable, "-c", CLIENT, lab.node_ip(fam), str(DNAT_PORT),
                "tcp,udp")
    out = set()
    for fam in (4, 6):
        gw_ip = lab.gw_ip4 if fam == 4 else lab.gw_ip6
        for proto in (TCP, UDP):
            out |= {(lab.node_ip(fam), proto), (gw_ip, proto), (lab.ext_ip(fam), proto)}
    return out


def program_for(lab: Lab, pods: list[int], decoys: int = 0) -> list[bpf.Insn]:
    """A program keeping ``pods`` (a /32 and a /128 each) plus ``decoys`` unrelated CIDRs."""
    cidrs = [f"{lab.pod_ip(p, 4)}/32" for p in pods] + [f"{lab.pod_ip(p, 6)}/128" for p in pods]
    rnd = random.Random(11)
    for i in range(decoys):  # never covering a lab address (172.16/12, fd99::/16)
        if i % 2:
            cidrs.append(f"{ipaddress.IPv4Address(0xAC100000 | rnd.getrandbits(20))}/"
                         f"{rnd.choice([24, 28, 32])}")
        else:
            cidrs.append(f"fd99:{rnd.getrandbits(16):x}:{rnd.getrandbits(16):x}::"
                         f"{rnd.getrandbits(16):x}/{rnd.choice([64, 112, 128])}")
    return bpf.build_program(cidrs)


class TestKernelFilter:
    def test_only_filtered_pods_arrive_and_replace_is_atomic(
            self, lab: Lab, sockets: tuple[Reader, Reader]) -> None:
        """Only events whose ORIGINAL source is an allowed pod reach the socket (v4 and
        v6, TCP/UDP/ICMP), whatever the reply tuple or destination holds; a re-attached
        program takes over; a ~1000-CIDR program attaches and still filters."""
        filt, ctrl = sockets
        for proto, port in (("tcp", 8080), ("udp", 8081)):
            for fam in (4, 6):
                lab.start_server(proto, port, fam)
        pods4_6 = {lab.pod_ip(p, f) for p in range(3) for f in (4, 6)}

        # Phase 1: pod 0 only.
        filt.attach(program_for(lab, [0]))
        want_all = pod_flows(lab, [0, 1, 2])
        others = other_flows(lab)
        assert ctrl.wait_for(lambda ev: want_all | others <= ctrl_flows(ctrl), 15), \
            sorted((want_all | others) - ctrl.new_flows())
        allowed = {lab.pod_ip(0, 4), lab.pod_ip(0, 6)}
        want = {f for f in want_all if f[0] in allowed}
        assert filt.wait_for(lambda ev: want <= filt.new_flows(), 10), want - filt.new_flows()
        assert {addr(e) for e in filt.events} <= allowed, filt.new_flows()
        assert {addr(e) for e in ctrl.events} & (pods4_6 - allowed)  # they did happen

        # Phase 2: replace with pods 0 and 1 while the socket stays open.
        filt.attach(program_for(lab, [0, 1]))
        filt.events.clear()
        ctrl.events.clear()
        want_all = pod_flows(lab, [0, 1, 2])
        other_flows(lab)
        allowed |= {lab.pod_ip(1, 4), lab.pod_ip(1, 6)}
        want = {f for f in want_all if f[0] in allowed}
        assert filt.wait_for(lambda ev: want <= filt.new_flows(), 10), want - filt.new_flows()
        assert {addr(e) for e in filt.events} <= allowed, filt.new_flows()

        # Phase 3: ~1000 CIDRs (trampolines, optmem), keeping pod 2 only.
        big = program_for(lab, [2], decoys=1000)
        print(f"\n1002-CIDR program: {len(big)} instructions")
        filt.attach(big)
        filt.events.clear()
        want_all = pod_flows(lab, [0, 1, 2])
        other_flows(lab)
        allowed = {lab.pod_ip(2, 4), lab.pod_ip(2, 6)}
        want = {f for f in want_all if f[0] in allowed}
        assert filt.wait_for(lambda ev: want <= filt.new_flows(), 10), want - filt.new_flows()
        assert {addr(e) for e in filt.events} <= allowed, filt.new_flows()

        bpf.detach(filt.sock)
        filt.events.clear()
        pod_flows(lab, [1])
        assert filt.wait_for(lambda ev: (lab.pod_ip(1, 4), TCP) in filt.new_flows(), 10)

    def test_flood_from_outside_the_filter(self, lab: Lab,
                                           sockets: tuple[Reader, Reader]) -> None:
        """Measurement (printed): a flood 90 % from sources outside the program reaches
        userspace only with its pod share; the pod's events are all delivered."""
        filt, ctrl = sockets
        lab.start_server("udp", 8081, 4)
        filt.attach(program_for(lab, [0]))
        rate, secs = 20000.0, 3.0
        floods = [lab.start_udp_flood(0, rate * 0.1, secs)]
        floods += [lab.start_udp_flood(p, rate * 0.45, secs) for p in (1, 2)]
        counts = {"filtered": 0, "control": 0}
        cpu = {"filtered": 0.0, "control": 0.0}
        end = time.monotonic() + secs + 3.0
        while time.monotonic() < end:
            ready = select.select([filt.sock, ctrl.sock], [], [], 0.2)[0]
            for sock in ready:
                reader, name = (filt, "filtered") if sock is filt.sock else (ctrl, "control")
                t0 = time.thread_time()
                # ENOBUFS on overrun: the losses are counted via socket_drops below.
                with contextlib.suppress(OSError):
                    counts[name] += reader.drain()
                cpu[name] += time.thread_time() - t0
        sent = [f.wait().sent for f in floods]
        drops = {n: conntrack.socket_drops(lab.gw, r.sock) for n, r in
                 (("filtered", filt), ("control", ctrl))}
        pod0 = sum(1 for e in filt.events if addr(e) == lab.pod_ip(0, 4) and e.proto == UDP
                   and e.action == "new")
        print(f"\nflood: sent pod0={sent[0]} others={sent[1] + sent[2]}; "
              f"received filtered={counts['filtered']} (pod0 NEW {pod0}, "
              f"{cpu['filtered'] * 1e3:.0f} ms CPU, drops {drops['filtered']}), "
              f"control={counts['control']} ({cpu['control'] * 1e3:.0f} ms CPU, "
              f"drops {drops['control']})")
        assert {addr(e) for e in filt.events} <= {lab.pod_ip(0, 4), lab.pod_ip(0, 6)}
        assert counts["filtered"] < counts["control"] * 0.3


def ctrl_flows(reader: Reader) -> set[tuple[str, int]]:
    """The NEW flows the control socket saw."""
    return reader.new_flows()
