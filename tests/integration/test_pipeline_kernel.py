"""The whole shipper on the real kernel: lab namespaces, MASQUERADE, real conntrack events.

Each test builds its own lab (unique namespace names), runs ``python -m shipper``
attached to the lab's gateway namespace with the file sink, makes traffic
that stays inside the lab, and checks the records. Everything is removed at
the end, also when a test fails (the fixtures stop the shipper by PID and the
lab deletes its namespaces).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shipper.lab import Lab
from tests.integration.harness import Record, ShipperProcess, ct_delete, get

pytestmark = pytest.mark.kernel  # root only; in CI a skip fails (tests/conftest.py)

Factory = Callable[..., ShipperProcess]


@pytest.fixture
def shipper(lab: Lab, tmp_path: Path) -> Iterator[Factory]:
    started: list[ShipperProcess] = []

    def start(**kw: object) -> ShipperProcess:
        sp = ShipperProcess(lab, tmp_path / f"s{len(started)}", **kw)  # type: ignore[arg-type]
        started.append(sp)
        return sp

    for i in range(4):
        (tmp_path / f"s{i}").mkdir()
    yield start
    for sp in started:
        sp.stop()


def action(a: str) -> Callable[[Record], bool]:
    return lambda r: get(r, "event.action") == a


def _check_collision(lab: Lab, sp: ShipperProcess, family: int) -> None:
    pods = [0, 1, 2]
    names = [lab.identities[p].name for p in pods]
    server = lab.start_server("tcp", 8080, family)
    lab.connect_many(pods, sport=40000, family=family, hold_s=3.0,
                     payloads=[n.encode() for n in names])
    seen = server.wait_seen(3, 10)
    assert len(seen) == 3
    node_ip = lab.node_ip(family)
    assert {ip for ip, _ in seen} == {node_ip}
    # MASQUERADE had to rewrite ports: the server saw three distinct ports, not all 40000.
    assert len({port for _, port in seen}) == 3
    assert sum(1 for _, port in seen if port != 40000) >= 2
    deadline = time.monotonic() + 10
    while len(server.payloads()) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    truth = {peer: data.decode() for peer, data in server.payloads().items()}
    assert len(truth) == 3
    news = sp.wait_records(
        lambda r: action("new")(r) and get(r, "destination.port") == 8080
        and get(r, "network.type") == f"ipv{family}",
        n=3,
    )
    # The seed's method (match the original source port) cannot tell them apart...
    assert {get(r, "source.port") for r in news} == {40000}
    # ...the post-NAT port can: each server-side peer maps to exactly the right pod.
    for (ip, port), pod_name in truth.items():
        hits = [r for r in news if get(r, "source.nat.ip") == ip
                and get(r, "source.nat.port") == port]
        assert len(hits) == 1, (ip, port, news)
        r = hits[0]
        assert get(r, "kubernetes.pod.name") == pod_name
        assert get(r, "kubernetes.namespace") == "shop"
        assert get(r, "flowlog.attribution") == "resolved"
        idx = names.index(pod_name)
        assert get(r, "source.ip") == lab.pod_ip(idx, family)
        assert get(r, "kubernetes.pod.ip") == lab.pod_ip(idx, family)
        assert get(r, "kubernetes.pod.uid") == lab.identities[idx].uid
        assert get(r, "kubernetes.node.name") == lab.node_name
        assert get(r, "kubernetes.owner.kind") in ("Deployment", "ReplicaSet")
        assert get(r, "host.name") == "lab-node"
        assert get(r, "network.transport") == "tcp"
        assert get(r, "network.iana_number") == "6"
        assert str(get(r, "network.community_id")).startswith("1:")


class TestAttribution:
    """Records name the right pod, joined on what the remote server saw."""

    def test_port_collision_ipv4(self, lab: Lab, shipper: Factory) -> None:
        """Three pods using one source port at once: each server-side port maps to its pod."""
        sp = shipper()
        sp.wait_ready()
        _check_collision(lab, sp, 4)

    def test_port_collision_forward_sink(self, lab: Lab, shipper: Factory) -> None:
        """The same end to end through the forward sink to a forward-protocol receiver:
        acked PackedForward batches with EventTime and the configured tag."""
        from tests.fakes.forward_receiver import ForwardReceiver

        rx = ForwardReceiver().start()
        sp = None
        try:
            sp = shipper(receiver=rx)
            sp.wait_ready()
            _check_collision(lab, sp, 4)
            got = rx.records()
            assert got and all(r.tag == "flowlog.test" for r in got)
            ids = [r.record["event"]["id"] for r in got]
            assert len(set(ids)) == len(ids)
            sp.wait_metric("shipper_records_shipped_total", 3, {"sink": "forward"})
        finally:
            if sp is not None:
                sp.stop()  # before the receiver goes, so the final flush is acked
            rx.close()

    def test_port_collision_ipv6(self, lab: Lab, shipper: Factory) -> None:
        """The same with ip6tables MASQUERADE over IPv6."""
        sp = shipper()
        sp.wait_ready()
        _check_collision(lab, sp, 6)

    def test_udp_and_icmp(self, lab: Lab, shipper: Factory) -> None:
        """UDP and ICMP (v4 and v6) flows become records with their transport names."""
        sp = shipper()
        sp.wait_ready()
        server = lab.start_server("udp", 9000, 4)
        lab.connect(1, "udp", 4, 9000)
        lab.ping(2, 4)
        lab.ping(0, 6)
        (ip, port), = server.wait_seen(1, 10)
        udp = sp.wait_records(lambda r: action("new")(r)
                              and get(r, "network.transport") == "udp")[0]
        assert get(udp, "source.nat.ip") == ip and get(udp, "source.nat.port") == port
        assert get(udp, "kubernetes.pod.name") == lab.identities[1].name
        assert get(udp, "network.iana_number") == "17"
        icmp = sp.wait_records(lambda r: action("new")(r)
                               and get(r, "network.transport") == "icmp")[0]
        assert get(icmp, "kubernetes.pod.name") == lab.identities[2].name
        assert get(icmp, "conntrack.icmp.type") == 8
        assert get(icmp, "source.nat.ip") == lab.node_ip4
        assert get(icmp, "source.port") is None
        icmp6 = sp.wait_records(lambda r: action("new")(r)
                                and get(r, "network.transport") == "ipv6-icmp")[0]
        assert get(icmp6, "kubernetes.pod.name") == lab.identities[0].name
        assert get(icmp6, "network.iana_number") == "58"
        assert get(icmp6, "network.type") == "ipv6"

    def test_destroy_carries_counters_and_timestamps(self, lab: Lab, shipper: Factory) -> None:
        """A DESTROY record has bytes/packets both ways, start, end and duration."""
        sp = shipper()
        sp.wait_ready()
        lab.start_server("tcp", 8080, 4)
        lab.connect(0, "tcp", 4, 8080, payload=b"x" * 1000)
        new = sp.wait_records(action("new"))[0]
        ct_delete(lab, "-s", lab.pod_ip(0, 4))
        d = sp.wait_records(action("destroy"))[0]
        assert get(d, "conntrack.id") == get(new, "conntrack.id")
        assert get(d, "kubernetes.pod.name") == lab.identities[0].name
        assert get(d, "source.nat.port") == get(new, "source.nat.port")
        assert get(d, "source.bytes") > 1000
        assert get(d, "source.packets") >= 3
        assert get(d, "destination.bytes") > 1000
        assert get(d, "destination.packets") >= 2
        assert get(d, "event.start") and get(d, "event.end")
        assert get(d, "event.end") >= get(d, "event.start")
        assert isinstance(get(d, "event.duration"), int) and get(d, "event.duration") > 0
        assert get(d, "event.type") == ["connection", "end"]
        assert sp.metric("shipper_conntrack_sysctl", {"name": "acct"}) == 1
        assert sp.metric("shipper_conntrack_sysctl", {"name": "timestamp"}) == 1

    def test_flows_before_start_are_snapshots(self, lab: Lab, shipper: Factory) -> None:
        """A flow open before the shipper starts is shipped once as action 'snapshot'."""
        lab.start_server("tcp", 8080, 4)
        lab.connect(2, "tcp", 4, 8080, hold_s=6.0)
        sp = shipper()
        snap = sp.wait_records(action("snapshot"))[0]
        assert get(snap, "kubernetes.pod.name") == lab.identities[2].name
        assert get(snap, "event.type") == ["connection", "info"]
        assert get(snap, "source.nat.ip") == lab.node_ip4

    def test_unresolved_source_is_shipped_and_counted(self, lab: Lab, shipper: Factory) -> None:
        """A pod missing from the inventory still gets a record, flagged and counted."""
        sp = shipper(pods_file=False)
        sp.wait_ready()
        lab.start_server("tcp", 8080, 4)
        lab.connect(1, "tcp", 4, 8080)
        r = sp.wait_records(action("new"))[0]
        assert get(r, "flowlog.attribution") == "unresolved"
        assert "kubernetes" not in r
        sp.wait_metric("shipper_records_unresolved_total", 1)

    def test_pod_ip_reuse_through_inventory_reload(self, lab: Lab, shipper: Factory) -> None:
        """After a pod's IP goes to a new pod, old and new flows (and their DESTROYs) name
        the pod that owned the IP when each flow started."""
        sp = shipper()
        sp.wait_ready()
        lab.start_server("tcp", 8080, 4)
        old_name = lab.identities[0].name
        lab.connect(0, "tcp", 4, 8080, hold_s=30.0)
        old_new = sp.wait_records(lambda r: action("new")(r)
                                  and get(r, "kubernetes.pod.name") == old_name)[0]
        # Kubernetes deletes the pod and gives its IP to a new one.
        lab.reassign_ip(0)
        new_name = lab.identities[0].name
        assert new_name != old_name
        time.sleep(1.1)  # the new pod is created at least a second later (RFC 3339 seconds)
        lab.write_pod_list(sp.pods_file)
        sp.wait_metric("shipper_inventory_reloads_total", 2, {"result": "ok"})
        lab.connect(0, "tcp", 4, 8080, hold_s=30.0)
        fresh = sp.wait_records(lambda r: action("new")(r)
                                and get(r, "source.ip") == lab.pod_ip(0, 4)
                                and get(r, "conntrack.id") != get(old_new, "conntrack.id"))[0]
        assert get(fresh, "kubernetes.pod.name") == new_name
        # Both entries end now: the old flow's DESTROY, long after its pod is gone,
        # still names the old pod.
        ct_delete(lab, "-s", lab.pod_ip(0, 4))
        destroys = sp.wait_records(action("destroy"), n=2)
        by_id = {get(r, "conntrack.id"): get(r, "kubernetes.pod.name") for r in destroys}
        assert by_id[get(old_new, "conntrack.id")] == old_name
        assert by_id[get(fresh, "conntrack.id")] == new_name


class TestForwardSpool:
    """The real CLI with the forward sink and the disk spool, across a SIGKILL."""

    def test_sigkill_while_receiver_down_then_everything_delivered(
        self, lab: Lab, shipper: Factory, tmp_path: Path
    ) -> None:
        """Records spooled while the receiver is down survive a SIGKILL of the shipper and
        are delivered, in order, by the next shipper once the receiver is back."""
        from tests.fakes.forward_receiver import ForwardReceiver

        rx = ForwardReceiver().start()
        rx.stop()  # down, but its port is kept for the restart
        spool = {"sink.spool.enabled": True, "sink.spool.dir": str(tmp_path / "spool"),
                 "sink.retry_initial_s": 0.05, "sink.retry_max_s": 0.2}
        try:
            sp = shipper(receiver=rx, config=spool)
            sp.wait_ready()
            lab.start_server("tcp", 8080, 4)
            for pod in (0, 1, 2, 0, 1):
                lab.connect(pod, "tcp", 4, 8080)
            sp.wait_metric("shipper_records_total", 5, {"action": "new"})
            sp.wait_metric("shipper_spool_records_total", 5, {"op": "spooled"})
            assert rx.records() == []
            sp.stop(signal.SIGKILL)
            rx.start()
            sp2 = shipper(receiver=rx, config=spool)
            got = sp2.wait_records(action("new"), n=5, timeout=30)
            names = [get(r, "kubernetes.pod.name") for r in got[:5]]
            assert names == [lab.identities[p].name for p in (0, 1, 2, 0, 1)]
            sp2.wait_metric("shipper_spool_records_total", 5, {"op": "replayed"})
        finally:
            rx.close()


    def test_open_batch_lost_by_sigkill_comes_back_from_the_dump_while_live(
        self, lab: Lab, shipper: Factory, tmp_path: Path
    ) -> None:
        """A record only in the open batch is lost by SIGKILL even with the spool on; if its
        flow is still in the table, the next start's dump ships it as a snapshot."""
        from tests.fakes.forward_receiver import ForwardReceiver

        rx = ForwardReceiver().start()
        cfg = {"sink.spool.enabled": True, "sink.spool.dir": str(tmp_path / "spool"),
               "batch.max_age_s": 60.0, "batch.max_records": 100000}
        try:
            sp = shipper(receiver=rx, config=cfg)
            sp.wait_ready()
            lab.start_server("tcp", 8080, 4)
            sport = lab.connect(1, "tcp", 4, 8080, hold_s=30.0)
            sp.wait_metric("shipper_records_total", 1, {"action": "new"})
            sp.stop(signal.SIGKILL)
            assert rx.records() == []
            sp2 = shipper(receiver=rx, config={**cfg, "batch.max_age_s": 0.2})
            snap = sp2.wait_records(
                lambda r: action("snapshot")(r) and get(r, "source.port") == sport)[0]
            assert get(snap, "kubernetes.pod.name") == lab.identities[1].name
        finally:
            rx.close()


def _via_rsyslog(sp: ShipperProcess, rs: Any) -> None:
    """Make ``sp.records()`` read the records rsyslog received (the JSON in each MSG)."""
    import orjson

    sp.records = lambda: [orjson.loads(line["msg"]) for line in rs.lines()]  # type: ignore[method-assign]


class TestSyslogSink:
    """The real CLI with the syslog sink: RELP to a real rsyslog, with the disk spool."""

    def test_port_collision_through_rsyslog(self, lab: Lab, shipper: Factory,
                                            tmp_path: Path) -> None:
        """Three pods sharing a source port, shipped over RELP: each port rsyslog's record
        names maps to the right pod, each record acked once."""
        from tests.integration.rsyslog import Rsyslog, require_rsyslog

        require_rsyslog("imrelp")
        with Rsyslog(tmp_path / "rs", "relp").start() as rs:
            cfg = {"sink.type": "syslog", "sink.syslog.addresses": [rs.address]}
            sp = shipper(config=cfg)
            _via_rsyslog(sp, rs)
            try:
                sp.wait_ready()
                _check_collision(lab, sp, 4)
                sp.wait_metric("shipper_records_shipped_total", 3, {"sink": "syslog"})
            finally:
                sp.stop()  # before rsyslog goes, so the final flush is acked
            ids = [get(r, "event.id") for r in sp.records()]
            assert len(set(ids)) == len(ids)
            assert all(line["app"] == "flowlog-shipper" and line["hostname"] == "lab-node"
                       for line in rs.lines())

    def test_sigkill_while_rsyslog_down_then_everything_delivered(
        self, lab: Lab, shipper: Factory, tmp_path: Path
    ) -> None:
        """Records spooled while rsyslog is down survive a SIGKILL of the shipper and are
        delivered over RELP, in order, by the next shipper once rsyslog is back."""
        from tests.integration.rsyslog import Rsyslog, require_rsyslog

        require_rsyslog("imrelp")
        rs = Rsyslog(tmp_path / "rs", "relp").start()
        rs.stop()  # down, its port kept for the restart
        cfg = {"sink.type": "syslog", "sink.syslog.addresses": [rs.address],
               "sink.spool.enabled": True, "sink.spool.dir": str(tmp_path / "spool"),
               "sink.retry_initial_s": 0.05, "sink.retry_max_s": 0.2}
        try:
            sp = shipper(config=cfg)
            _via_rsyslog(sp, rs)
            sp.wait_ready()
            lab.start_server("tcp", 8080, 4)
            for pod in (0, 1, 2, 0, 1):
                lab.connect(pod, "tcp", 4, 8080)
            sp.wait_metric("shipper_records_total", 5, {"action": "new"})
            sp.wait_metric("shipper_spool_records_total", 5, {"op": "spooled"})
            sp.stop(signal.SIGKILL)
            assert rs.lines() == []
            rs.start(keep_port=True)
            sp2 = shipper(config=cfg)
            _via_rsyslog(sp2, rs)
            got = sp2.wait_records(action("new"), n=5, timeout=30)
            names = [get(r, "kubernetes.pod.name") for r in got[:5]]
            assert names == [lab.identities[p].name for p in (0, 1, 2, 0, 1)]
            sp2.wait_metric("shipper_spool_records_total", 5, {"op": "replayed"})
            sp2.stop()
        finally:
            rs.stop()


class TestOverrun:
    """A socket overrun loses events, is counted and reported, and the shipper lives on."""

    def test_burst_beyond_tiny_buffer_gives_gap_and_resync(
        self, lab: Lab, shipper: Factory
    ) -> None:
        """Overrun: a gap record with the kernel's loss count, metrics, a resync dump."""
        sp = shipper(config={"conntrack.rcvbuf_bytes": 4096,
                             "conntrack.drain_interval_ms": 300.0})
        sp.wait_ready()
        lab.set_sysctl(lab.gw, "net.netfilter.nf_conntrack_udp_timeout", "60")
        lab.udp_flood(0, rate=20000, duration=1.0, max_count=5000)
        gap = sp.wait_records(action("gap"), timeout=20)[0]
        lost = get(gap, "flowlog.gap.lost_events")
        assert isinstance(lost, int) and lost > 0
        assert get(gap, "event.kind") == "pipeline_error"
        assert get(gap, "flowlog.gap.resync") is True
        sp.wait_metric("shipper_events_lost_total", 1)
        sp.wait_metric("shipper_overruns_total", 1)
        sp.wait_metric("shipper_resyncs_total", 1)
        # The resync dump ships the flows that were lost as events.
        sp.wait_records(action("snapshot"), n=100, timeout=20)
        # Still alive and still shipping.
        assert sp.proc.poll() is None
        lab.start_server("tcp", 8080, 4)
        lab.connect(2, "tcp", 4, 8080)
        sp.wait_records(lambda r: action("new")(r) and get(r, "network.transport") == "tcp")


class TestLifecycle:
    """Start-up errors, shutdown and the one-shot dump."""

    def test_sigterm_flushes_the_open_batch(self, lab: Lab, shipper: Factory) -> None:
        """Records still in an open batch are written on SIGTERM, and the exit is clean."""
        sp = shipper(config={"batch.max_age_s": 60.0, "batch.max_records": 100000})
        sp.wait_ready()
        lab.start_server("tcp", 8080, 4)
        lab.connect(1, "tcp", 4, 8080)
        sp.wait_metric("shipper_records_total", 1, {"action": "new"})
        assert sp.records() == []  # still batched
        t0 = time.monotonic()
        assert sp.stop(signal.SIGTERM) == 0
        assert time.monotonic() - t0 < 15
        recs = [r for r in sp.records() if get(r, "event.action") == "new"]
        assert len(recs) == 1
        assert get(recs[0], "kubernetes.pod.name") == lab.identities[1].name

    def test_dump_subcommand(self, lab: Lab, tmp_path: Path) -> None:
        """`dump` prints the current table as snapshot records on stdout and exits 0."""
        lab.start_server("tcp", 8080, 4)
        lab.connect(1, "tcp", 4, 8080, hold_s=8.0)
        pods = lab.write_pod_list(tmp_path / "pods.json")
        res = subprocess.run(
            [sys.executable, "-m", "shipper", "dump", "--netns", lab.gw,
             *[a for c in lab.pod_cidrs() for a in ("--pod-cidr", c)],
             *[a for c in lab.cluster_cidrs() for a in ("--exclude-cidr", c)],
             "--pods-file", str(pods), "--metrics-address", "none"],
            capture_output=True, timeout=60, check=False,
        )
        assert res.returncode == 0, res.stderr
        import json

        recs = [json.loads(x) for x in res.stdout.splitlines()]
        assert recs, res.stderr
        assert all(get(r, "event.action") == "snapshot" for r in recs)
        assert get(recs[0], "kubernetes.pod.name") == lab.identities[1].name

    def test_missing_namespace_is_a_clear_error(self, tmp_path: Path) -> None:
        """A namespace that does not exist: exit 3 and a log line naming it."""
        res = subprocess.run(
            [sys.executable, "-m", "shipper", "run", "--netns", "no-such-ns-flowlog-test",
             "--pod-cidr", "10.244.0.0/16", "--metrics-address", "none"],
            capture_output=True, text=True, timeout=30, check=False,
        )
        assert res.returncode == 3
        assert "no-such-ns-flowlog-test" in res.stderr

    def test_bad_config_is_a_clear_error(self, tmp_path: Path) -> None:
        """Bad CIDRs and unknown keys: exit 2, every problem named with its key and file."""
        cfg = tmp_path / "bad.yaml"
        cfg.write_text("filter:\n  pod_cidrs: [10.244.0.0/33, nonsense]\n  colour: blue\n")
        res = subprocess.run(
            [sys.executable, "-m", "shipper", "run", "--config", str(cfg)],
            capture_output=True, text=True, timeout=30, check=False,
        )
        assert res.returncode == 2
        assert str(cfg) in res.stderr
        assert "10.244.0.0/33" in res.stderr and "nonsense" in res.stderr
        assert "filter.colour: unknown key" in res.stderr
