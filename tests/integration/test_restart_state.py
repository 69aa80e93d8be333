"""Restarts keep pod history (issue 7, part 4), on the real kernel.

A DaemonSet rolling update restarts the shipper. Here pod A has live TCP and
UDP flows (IPv4 and IPv6) when the shipper (the real CLI process) is stopped;
while it is down A is deleted and a new pod B gets A's IPv4 and IPv6
addresses; the shipper starts again and dumps the table, then the flows end
(``conntrack -D`` in the lab's gateway: DESTROY events now). Pods reach the
shipper through the pods file or through the fake Kubernetes API
(``tests/fakes/kube_api.py``), which no longer know A.

With the state file the snapshot and destroy records of A's flows name A and
B's new flows name B. Without it (a first start, a lost file) A's records
must not name B as resolved: they say ``flowlog.attribution: uncertain``.

Each test builds its own lab and fake API, stops every shipper by PID and
deletes its namespaces, also when it fails. Waits are bounded polls; the
only deliberate pause waits for the next wall-clock second so that B's
``creationTimestamp`` (second resolution) is later than A's flows.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shipper.lab import Lab
from tests.fakes.kube_api import NODES, PODS, FakeKubeApi, node, write_kubeconfig
from tests.integration.harness import Record, ShipperProcess, ct_delete, get

# Root only (in CI a skip fails); the shared lab; no ambient Kubernetes config:
# tests/conftest.py.
pytestmark = [pytest.mark.kernel, pytest.mark.lab(pods=2),
              pytest.mark.usefixtures("no_ambient_kube")]

#: Long enough to outlive the test; the lab kills held clients on close.
HOLD_S = 120.0
#: A's flows start a few seconds before B exists. With the default 5 s the skew
#: rule would reach them only when the test runs fast; 30 s makes the no-history
#: case deterministic (the failure it guards against: a match through the skew).
SKEW_S = 30.0
FLOWS = [("tcp", 4, 8080), ("tcp", 6, 8080), ("udp", 4, 5353), ("udp", 6, 5353)]


def next_second() -> None:
    """Wait (at most 1 s) until the wall clock enters a new second."""
    start = int(time.time())
    deadline = time.monotonic() + 2.0
    while int(time.time()) <= start:
        assert time.monotonic() < deadline, "clock did not advance"
        time.sleep(0.01)


def names(r: Record) -> tuple[str | None, str | None, str | None]:
    return (get(r, "flowlog.attribution"), get(r, "kubernetes.pod.name"),
            get(r, "kubernetes.pod.uid"))


@pytest.fixture
def lab(lab: Lab) -> Lab:
    """The shared lab (tests/conftest.py) with long conntrack timeouts in its gateway."""
    # Keep A's entries in the table for the whole test, whatever state killing
    # its clients leaves them in (only this lab's gateway namespace is touched).
    for key, value in (("udp_timeout", 600), ("udp_timeout_stream", 600),
                       ("tcp_timeout_close", 600), ("tcp_timeout_time_wait", 600),
                       ("tcp_timeout_fin_wait", 600), ("tcp_timeout_close_wait", 600),
                       ("tcp_timeout_last_ack", 600)):
        lab.set_sysctl(lab.gw, f"net.netfilter.nf_conntrack_{key}", value)
    return lab


class Source:
    """Where pods come from: the pods file the harness writes, or the fake API."""

    def __init__(self, kind: str, lab: Lab, tmp: Path) -> None:
        self.kind = kind
        self.lab = lab
        self.api: FakeKubeApi | None = None
        self.config: dict[str, Any] = {}
        if kind == "api":
            self.api = FakeKubeApi().start()
            self.api.put(NODES, node(lab.node_name, [lab.node_ip4, lab.node_ip6]))
            kubeconfig = write_kubeconfig(tmp / "kubeconfig", self.api.url)
            self.config = {
                "kubernetes.kubeconfig": str(kubeconfig),
                "kubernetes.in_cluster": "never",
                "kubernetes.sync_timeout_s": 30.0,
                "kubernetes.request_timeout_s": 5.0,
                "kubernetes.backoff_initial_s": 0.1,
                "kubernetes.backoff_max_s": 0.5,
            }
            self.publish()

    @property
    def pods_file(self) -> bool:
        return self.kind == "file"

    def publish(self, only: list[int] | None = None) -> None:
        """Put the lab's current pods (or those in ``only``) into the fake API."""
        assert self.api is not None
        for i, item in enumerate(self.lab.pod_list()["items"]):
            if only is None or i in only:
                self.api.put(PODS, item)

    def delete_pod(self, i: int) -> None:
        """Delete lab pod ``i`` from the fake API (the pods file is rewritten at start)."""
        if self.api is not None:
            ident = self.lab.identities[i]
            self.api.delete(PODS, f"{ident.namespace}/{ident.name}")

    def close(self) -> None:
        if self.api is not None:
            self.api.stop()


@pytest.fixture(params=["file", "api"], ids=["pods_file", "fake_api"])
def source(request: pytest.FixtureRequest, lab: Lab, tmp_path: Path) -> Iterator[Source]:
    src = Source(request.param, lab, tmp_path)
    try:
        yield src
    finally:
        src.close()


@pytest.fixture
def shipper(lab: Lab, source: Source, tmp_path: Path) -> Iterator[Callable[..., ShipperProcess]]:
    """Start ``python -m shipper run`` (a new process each call) fed by ``source``."""
    started: list[ShipperProcess] = []

    def start(state_dir: Path) -> ShipperProcess:
        tmp = tmp_path / f"s{len(started)}"
        tmp.mkdir()
        cfg = {**source.config, "state_dir": str(state_dir), "enrich.clock_skew_s": SKEW_S}
        sp = ShipperProcess(lab, tmp, config=cfg, pods_file=source.pods_file)
        started.append(sp)
        return sp

    try:
        yield start
    finally:
        for sp in started:
            with contextlib.suppress(Exception):  # stop every one, whatever happens
                sp.stop()


@pytest.mark.parametrize("history", [True, False], ids=["state_file", "no_state_file"])
def test_restart_with_ip_reuse(
    lab: Lab, source: Source, shipper: Callable[..., ShipperProcess], tmp_path: Path,
    history: bool,
) -> None:
    """A's flows, still in the table when the shipper restarts after A's IPs went to B, are
    A's in their snapshot and destroy records with the state file (B's new flows are B's);
    without it they are 'uncertain', never B's as resolved."""
    state_dir = tmp_path / "state"
    for proto, family, port in FLOWS:
        lab.start_server(proto, port, family)
    pod_a = lab.identities[0]
    ips = {4: lab.pod_ip(0, 4), 6: lab.pod_ip(0, 6)}

    # 1. A has live TCP and UDP flows (v4 and v6); the shipper sees them, then stops.
    first = shipper(state_dir)
    first.wait_ready()
    for proto, family, port in FLOWS:
        lab.connect(0, proto, family, port, hold_s=HOLD_S)
    new_a = first.wait_records(lambda r: get(r, "event.action") == "new"
                               and get(r, "source.ip") in ips.values(), n=len(FLOWS))
    for r in new_a:
        assert names(r) == ("resolved", pod_a.name, pod_a.uid), r
    a_ids = {get(r, "conntrack.id") for r in new_a}
    assert len(a_ids) == len(FLOWS)
    assert first.stop() == 0
    assert (state_dir / "pod-index.state").exists()

    # 2. A is deleted; B, created a second later, gets A's IPv4 and IPv6 addresses.
    source.delete_pod(0)
    next_second()
    lab.reassign_ip(0)
    pod_b = lab.identities[0]
    assert (pod_b.name, pod_b.uid) != (pod_a.name, pod_a.uid)
    if source.api is not None:
        source.publish(only=[0])

    # 3. The shipper starts again (without history: from an empty state directory).
    second = shipper(state_dir if history else tmp_path / "fresh-state")
    second.wait_ready()
    snaps = second.wait_records(lambda r: get(r, "event.action") == "snapshot"
                                and get(r, "conntrack.id") in a_ids, n=len(FLOWS))
    for proto, family, port in FLOWS[:2] + FLOWS[2:3]:
        lab.connect(0, proto, family, port, hold_s=HOLD_S)
    new_b = second.wait_records(lambda r: get(r, "event.action") == "new"
                                and get(r, "source.ip") in ips.values(), n=3)
    b_ids = {get(r, "conntrack.id") for r in new_b}
    assert not b_ids & a_ids

    # 4. The flows end.
    for ip in ips.values():
        ct_delete(lab, "-s", ip)
    destroys = second.wait_records(lambda r: get(r, "event.action") == "destroy"
                                   and get(r, "conntrack.id") in a_ids | b_ids,
                                   n=len(a_ids | b_ids))

    a_records = snaps + [d for d in destroys if get(d, "conntrack.id") in a_ids]
    b_records = new_b + [d for d in destroys if get(d, "conntrack.id") in b_ids]
    assert len(a_records) == 2 * len(FLOWS)
    for r in b_records:
        assert names(r) == ("resolved", pod_b.name, pod_b.uid), r
    if history:
        for r in a_records:
            assert names(r) == ("resolved", pod_a.name, pod_a.uid), r
        assert second.metric("shipper_records_uncertain_total") == 0
        assert second.metric("shipper_state_load_errors_total") == 0
    else:
        for r in a_records:
            assert get(r, "flowlog.attribution") == "uncertain", r
            # B is only a candidate: the shipper never knew A.
            assert get(r, "kubernetes.pod.uid") == pod_b.uid, r
        second.wait_metric("shipper_records_uncertain_total", len(a_records))
    assert second.metric("shipper_records_unresolved_total") == 0
