"""Sharded readers (``conntrack.workers``) on the real kernel: shares disjoint and complete.

Each test builds its own lab (unique namespace names, removed with every socket,
rule and process also on failure) and makes a bounded number of UDP flows from
a pod through the MASQUERADE gateway, each datagram a new conntrack entry, then
deletes them (``conntrack -D``) so every flow also has a DESTROY.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shipper.lab import Lab
from shipper.sources import bpf, conntrack
from shipper.sources.decode import LayoutDecoder
from tests.integration.harness import Record, ShipperProcess, ct_delete, event_socket, get

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
    socks = [event_socket(lab) for _ in range(3)]
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


def wait_readyz(sp: ShipperProcess, timeout: float = 30.0) -> dict[str, Any]:
    """Poll /readyz until 200 (bounded); return its body."""
    url = f"http://127.0.0.1:{sp.metrics_port}/readyz"
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if sp.proc.poll() is not None:
            raise AssertionError(f"shipper exited ({sp.proc.returncode}): {sp.stderr()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return dict(json.loads(resp.read()))
        except urllib.error.HTTPError as exc:
            last = exc.read()
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"not ready after {timeout}s: {last!r}\n{sp.stderr()[-3000:]}")


def children(pid: int) -> list[int]:
    """The direct child processes of ``pid`` (the shipper's readers)."""
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(x) for x in text.split()]


def udp(action: str) -> Callable[[Record], bool]:
    return lambda r: (get(r, "event.action") == action
                      and get(r, "network.transport") == "udp")


@pytest.mark.lab(pods=1)
@pytest.mark.parametrize(("family", "reliable"), [(4, False), (6, False), (4, True)])
def test_two_workers_ship_every_flow_exactly_once(lab: Lab, tmp_path: Path,
                                                  family: int, reliable: bool) -> None:
    """conntrack.workers: 2 -> two reader processes; FLOWS flows' NEW and DESTROY records
    are each shipped exactly once in the one output file, attributed to the pod (the pods
    file is loaded by the parent after the fork and replicated), both readers had a
    non-empty share (each its own share program, its log lines marked), nothing is
    counted lost, and SIGTERM ends it with exit 0. Also with reliable DESTROY (its
    second socket gets the same share)."""
    sp = ShipperProcess(lab, tmp_path, config={"conntrack.workers": 2,
                                               "conntrack.reliable_destroy": reliable})
    try:
        body = wait_readyz(sp)
        assert body["conditions"]["subscribed"]["reason"] == "2 of 2 readers"
        assert len(children(sp.proc.pid)) == 2
        make_flows(lab, family)
        ct_delete(lab, "-p", "udp", "-f", "ipv6" if family == 6 else "ipv4")
        sp.wait_records(udp("destroy"), n=FLOWS, timeout=30)
        for k in ("0", "1"):
            assert sp.wait_metric("shipper_worker_events_total", 1, {"worker": k}) >= 1
        events = sp.wait_metric("shipper_events_total", 2 * FLOWS)
        per_worker = sum(sp.metric("shipper_worker_events_total", {"worker": k})
                         for k in ("0", "1"))
        assert per_worker == events  # the totals are the workers' sum
        assert sp.metric("shipper_events_lost_total") == 0
    finally:
        code = sp.stop()
    assert code == 0, sp.stderr()[-3000:]
    records = sp.records()
    assert not [r for r in records if get(r, "event.action") == "gap"]
    pod = lab.pod_list()["items"][0]["metadata"]["name"]
    ids: dict[str, list[int]] = {}
    for action in ("new", "destroy"):
        mine = [r for r in records if udp(action)(r)]
        ids[action] = [get(r, "conntrack.id") for r in mine]
        assert len(ids[action]) == len(set(ids[action])) == FLOWS, action  # each once
        assert len({get(r, "destination.port") for r in mine}) == FLOWS
        assert {get(r, "kubernetes.pod.name") for r in mine} == {pod}
    assert sorted(ids["new"]) == sorted(ids["destroy"])
    assert {i % 2 for i in ids["new"]} == {0, 1}  # both shares shipped
    attached = {(line.get("worker"), tuple(line.get("share") or ())) for line in sp.logs()
                if line.get("msg") == "in-kernel filter attached"}
    assert attached == {(0, (0, 2)), (1, (1, 2))}


@pytest.mark.lab(pods=1, ipv6=False)
def test_a_dead_worker_stops_the_agent_with_a_gap(lab: Lab, tmp_path: Path) -> None:
    """A reader killed with SIGKILL: the shipper does not run on with a missing share; it
    writes a gap record, counts the failure, stops the other reader and exits 3."""
    sp = ShipperProcess(lab, tmp_path, config={"conntrack.workers": 2})
    try:
        wait_readyz(sp)
        victim = children(sp.proc.pid)[1]
        os.kill(victim, signal.SIGKILL)
        sp.proc.wait(30)
    finally:
        code = sp.stop()
    assert code == 3, sp.stderr()[-3000:]
    gaps = [r for r in sp.records() if get(r, "event.action") == "gap"]
    assert len(gaps) == 1
    assert any(line.get("msg", "").startswith("reader failed") for line in sp.logs())
