"""Sharded readers (``conntrack.workers``) on the real kernel: shares disjoint and complete.

Each test builds its own lab (unique namespace names, removed with every socket,
rule and process also on failure) and makes a bounded number of UDP flows from
a pod through the MASQUERADE gateway, each datagram a new conntrack entry, then
deletes them (``conntrack -D``) so every flow also has a DESTROY.
"""

from __future__ import annotations

import socket
import time

import pytest

from shipper.lab import Lab
from shipper.sources import bpf, conntrack
from shipper.sources.decode import LayoutDecoder
from tests.integration.harness import ct_delete

pytestmark = pytest.mark.kernel  # root only; in CI a skip fails (tests/conftest.py)

FLOWS = 300
UDP = 17


@pytest.fixture
def lab(lab: Lab) -> Lab:
    """The shared lab with conntrack events on and a UDP timeout longer than any test."""
    lab.set_sysctl(lab.gw, "net.netfilter.nf_conntrack_events", 1)
    lab.set_sysctl(lab.gw, "net.netfilter.nf_conntrack_udp_timeout", 120)
    return lab


def make_flows(lab: Lab, family: int) -> None:
    """FLOWS new UDP flows pod 0 -> ext (one per datagram), then delete them all."""
    res = lab.udp_flood(0, 2000, FLOWS / 2000 + 0.5, family=family, max_count=FLOWS)
    assert res.sent == FLOWS


def read_ids(socks: list[socket.socket], want_new: int, want_destroy: int,
             control: int, timeout: float = 20.0) -> list[dict[str, list[int]]]:
    """Read every socket until the control socket (index ``control``) saw ``want_new``
    NEW and ``want_destroy`` DESTROY UDP events, then 0.5 s more; ct ids by action."""
    dec = LayoutDecoder()
    buf = bytearray(1 << 16)
    seen: list[dict[str, list[int]]] = [{"new": [], "destroy": []} for _ in socks]
    deadline = time.monotonic() + timeout
    settle: float | None = None
    while time.monotonic() < deadline:
        got = False
        for i, s in enumerate(socks):
            while True:
                try:
                    n = s.recv_into(buf)
                except BlockingIOError:
                    break
                except OSError as exc:
                    raise AssertionError(f"socket {i}: {exc}") from exc
                got = True
                off = 0
                while off < n:
                    ev, mlen = dec.decode(buf, off, 0)
                    if ev is not None and ev.proto == UDP and ev.action in seen[i]:
                        seen[i][ev.action].append(ev.ct_id or 0)
                    off += (mlen + 3) & ~3
        c = seen[control]
        if settle is None and len(c["new"]) >= want_new and len(c["destroy"]) >= want_destroy:
            settle = time.monotonic() + 0.5
        if settle is not None and time.monotonic() >= settle:
            break
        if not got:
            time.sleep(0.01)
    return seen


@pytest.mark.lab(pods=1)
@pytest.mark.parametrize("family", [4, 6])
def test_socket_shares_are_disjoint_and_complete(lab: Lab, family: int) -> None:
    """Two event sockets with the share programs (0 and 1 of 2) plus the pod-CIDR test
    together get every NEW and DESTROY of FLOWS pod flows exactly once, as an unsharded
    control socket gets them; both shares are non-empty and nothing is dropped."""
    cidrs = lab.pod_cidrs()
    socks = [conntrack.open_event_socket(lab.gw, ["new", "destroy"], 8 << 20)
             for _ in range(3)]
    try:
        for k in range(2):
            bpf.attach(socks[k], bpf.build_program(cidrs, share=(k, 2)))
        bpf.attach(socks[2], bpf.build_program(cidrs))
        for s in socks:  # what queued before the programs judged it
            try:
                while s.recv(1 << 16):
                    pass
            except BlockingIOError:
                pass
        drops0 = [conntrack.socket_drops(lab.gw, s) for s in socks]
        make_flows(lab, family)
        ct_delete(lab, "-p", "udp", "-f", "ipv6" if family == 6 else "ipv4")
        seen = read_ids(socks, FLOWS, FLOWS, control=2)
        control = seen[2]
        assert len(control["new"]) == len(set(control["new"])) == FLOWS
        assert sorted(control["destroy"]) == sorted(control["new"])
        for action in ("new", "destroy"):
            a, b = seen[0][action], seen[1][action]
            assert a and b, (action, len(a), len(b))  # both workers got a share
            assert not set(a) & set(b)  # disjoint
            assert sorted(a + b) == sorted(control[action])  # complete, each once
            assert all(i % 2 == 0 for i in a) and all(i % 2 == 1 for i in b)
        assert [conntrack.socket_drops(lab.gw, s) for s in socks] == drops0
    finally:
        for s in socks:
            s.close()
