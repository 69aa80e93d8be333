"""The namespace lab itself: topology, MASQUERADE port collisions, teardown.

Needs root, iproute2, iptables/ip6tables and netfilter NAT (``-m kernel``).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from shipper.lab import Lab, LabError

pytestmark = pytest.mark.kernel  # root only; in CI a skip fails (tests/conftest.py)


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True,
                         timeout=10).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _ns_of(prefix: str) -> set[str]:
    return {n for n in _netns_names() if n.startswith(prefix + "-")}


class TestTopology:
    def test_namespaces_exist_with_the_documented_names(self, lab: Lab) -> None:
        """gw, ext and one namespace per pod exist under the lab's prefix."""
        assert _ns_of(lab.prefix) == {lab.gw, lab.ext, *lab.pod_ns}
        assert len(lab.pod_ns) == 3

    @pytest.mark.parametrize("family", [4, 6])
    def test_every_pod_reaches_ext(self, lab: Lab, family: int) -> None:
        """Every pod can ping the external host over v4 and v6 right after setup."""
        for i in range(3):
            lab.ping(i, family=family)

    @pytest.mark.parametrize(("proto", "family"), [("tcp", 4), ("tcp", 6), ("udp", 4),
                                                   ("udp", 6)])
    def test_server_sees_the_node_address(self, lab: Lab, proto: str, family: int) -> None:
        """Pod traffic is MASQUERADEd: the server sees the node IP, not the pod IP."""
        server = lab.start_server(proto=proto, port=8080, family=family)
        sport = lab.connect(1, proto=proto, family=family)
        seen = server.wait_seen(1, timeout=5)
        assert seen == [(lab.node_ip(family), sport)]

    def test_conntrack_in_gw_has_pod_source_and_node_reply(self, lab: Lab) -> None:
        """The gw's conntrack entry has the pod as original source, the node as reply dst."""
        lab.start_server()
        sport = lab.connect(2)
        out = lab.run(lab.gw, "conntrack", "-L", "-p", "tcp", "--orig-src", lab.pod_ip(2)).stdout
        assert f"sport={sport} dport=8080" in out
        assert f"dst={lab.node_ip4}" in out

    def test_pod_list_names_every_pod_with_its_ips(self, lab: Lab) -> None:
        """pod_list() is a v1 PodList with one Running pod per lab pod and its v4+v6 IPs."""
        pods = lab.pod_list()
        assert pods["kind"] == "List"
        ips = [[p["ip"] for p in item["status"]["podIPs"]] for item in pods["items"]]
        assert ips == [[lab.pod_ip(i, 4), lab.pod_ip(i, 6)] for i in range(3)]
        assert all(item["status"]["phase"] == "Running" for item in pods["items"])


class TestCollision:
    @pytest.mark.parametrize(("proto", "family"), [("tcp", 4), ("tcp", 6), ("udp", 4)])
    def test_same_source_port_is_rewritten_for_all_but_one(self, lab: Lab, proto: str,
                                                           family: int) -> None:
        """Three pods using one sport at once: the server sees three distinct node ports."""
        server = lab.start_server(proto=proto, port=8443, family=family)
        ports = lab.connect_many([0, 1, 2], sport=40123, proto=proto, family=family,
                                 dport=8443, hold_s=1.0)
        assert ports == [40123, 40123, 40123]
        seen = server.wait_seen(3, timeout=5)
        assert {ip for ip, _ in seen} == {lab.node_ip(family)}
        assert len({port for _, port in seen}) == 3
        assert 40123 in {port for _, port in seen}


class TestFlood:
    def test_flood_makes_one_new_flow_per_datagram(self, lab: Lab) -> None:
        """Each flood datagram is a new NATed flow, as counted by the MASQUERADE rule."""
        before = lab.nat_new_flows()
        result = lab.udp_flood(0, rate=2000, duration=0.5)
        assert 900 <= result.sent <= 1000
        assert lab.nat_new_flows() - before == result.sent


class TestReassign:
    def test_reassigned_ip_lives_in_a_new_namespace(self, lab: Lab) -> None:
        """reassign_ip moves the pod's IPs to a new namespace with a new identity."""
        old_ns, old_uid = lab.pod_ns[1], lab.identities[1].uid
        new_ns = lab.reassign_ip(1)
        assert new_ns != old_ns and lab.pod_ns[1] == new_ns
        assert old_ns not in _netns_names()
        assert lab.identities[1].uid != old_uid
        server = lab.start_server()
        sport = lab.connect(1)
        assert server.wait_seen(1, timeout=5) == [(lab.node_ip4, sport)]


class TestTeardown:
    def test_close_removes_everything_and_is_idempotent(self) -> None:
        """After close() no namespace, process or work dir of the lab is left."""
        lab = Lab(pods=2)
        server = lab.start_server()
        lab.connect(0, hold_s=30)
        prefix, workdir = lab.prefix, lab.workdir
        lab.close()
        lab.close()
        assert _ns_of(prefix) == set()
        assert server.proc.poll() is not None
        assert not Path(workdir).exists()

    def test_failed_setup_removes_what_was_built(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A step failing midway raises LabError and leaves no namespace behind."""
        calls = []
        real = Lab._add_pod_ns

        def failing(self: Lab, i: int, ns: str) -> None:
            calls.append(ns)
            if i == 1:
                raise LabError("injected failure")
            real(self, i, ns)

        monkeypatch.setattr(Lab, "_add_pod_ns", failing)
        prefix = f"fltest{os.getpid()}"
        with pytest.raises(LabError, match="injected"):
            Lab(prefix=prefix, pods=3)
        assert len(calls) == 2
        assert _ns_of(prefix) == set()
        assert not Path(f"/tmp/{prefix}-lab").exists()

    def test_error_inside_with_block_still_cleans_up(self) -> None:
        """A failing lab command (a bad sysctl) raises LabError; leaving the block cleans up."""
        prefix = f"fltestb{os.getpid()}"
        with Lab(prefix=prefix, pods=1) as lab, pytest.raises(LabError):
            lab.set_sysctl(lab.gw, "net.no.such.key", 1)
        assert _ns_of(prefix) == set()

    def test_close_in_a_forked_child_leaves_the_lab_intact(self, lab: Lab) -> None:
        """close() (or the exit hook) in a forked child, as pyroute2 forks, removes nothing."""
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            try:
                lab.close()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert _ns_of(lab.prefix) == {lab.gw, lab.ext, *lab.pod_ns}
        lab.ping(0)

    def test_prefix_in_use_is_refused(self, lab: Lab) -> None:
        """A second lab with a prefix already in use is refused, the first left intact."""
        with pytest.raises(LabError, match="already exist"):
            Lab(prefix=lab.prefix)
        assert lab.gw in _netns_names()
