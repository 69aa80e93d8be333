"""Pod attribution from the live Kubernetes API on the real kernel (issue 3).

Each test builds its own lab (gateway namespace with MASQUERADE, pod
namespaces, an external host) and its own fake Kubernetes API server on
127.0.0.1 port 0, runs ``python -m shipper run`` with a kubeconfig pointing at
the fake and no pods file, makes traffic that stays inside the lab, and checks
the records the file sink wrote. Pods and Kube-OVN Subnets reach the shipper
only through list + watch. Everything is removed at the end, also when a test
fails: the shipper is stopped by PID, the fake API is stopped, the lab deletes
its namespaces.

Waits are bounded polls. The only deliberate pause waits for the next wall
clock second, so that a pod created later also has a later RFC 3339
``creationTimestamp`` (second resolution).
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest

from shipper.lab import Lab
from tests.fakes.kube_api import (
    NODES,
    PODS,
    SUBNETS,
    FakeKubeApi,
    node,
    subnet,
    write_kubeconfig,
)
from tests.integration.harness import Record, ShipperProcess, ct_delete, get

# Root only (in CI a skip fails); no ambient Kubernetes config: tests/conftest.py.
pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("no_ambient_kube")]

Factory = Callable[..., ShipperProcess]
T = TypeVar("T")

#: Bound of every wait for the shipper (records, metrics, logs).
WAIT_S = 15.0
#: A record must appear this soon after its connection, also while the API is down
#: (batch.max_age_s is 0.2 s in the harness, so this leaves a wide margin for CI noise).
MAX_LATENCY_S = 2.0
#: Long enough to outlive any test; the lab kills held clients on close.
HOLD_S = 60.0


# ---- helpers ----------------------------------------------------------------------


def poll(fn: Callable[[], T], ok: Callable[[T], bool], what: str,
         timeout: float = WAIT_S) -> T:
    """Call ``fn`` until ``ok(value)`` (bounded); return the value or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if ok(value):
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: still {value!r} after {timeout}s")
        time.sleep(0.05)


def metric_now(sp: ShipperProcess, name: str, labels: dict[str, str] | None = None) -> float:
    """One /metrics sample; -1 while the endpoint does not answer yet."""
    try:
        return sp.metric(name, labels)
    except OSError:
        return -1.0


def wait_gauge(sp: ShipperProcess, name: str, value: float,
               labels: dict[str, str] | None = None, timeout: float = WAIT_S) -> None:
    """Poll until a sample equals ``value`` exactly (gauges may go down as well as up)."""
    poll(lambda: metric_now(sp, name, labels), lambda v: v == value,
         f"{name}{labels or ''} != {value}", timeout)


def probe(url: str) -> tuple[int, dict[str, Any]]:
    """GET a health endpoint: (status, JSON body), also for 503."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def is_new(r: Record) -> bool:
    return get(r, "event.action") == "new"


def from_ip(ip: str) -> Callable[[Record], bool]:
    return lambda r: get(r, "source.ip") == ip


def next_second() -> None:
    """Wait (at most 1 s) until the wall clock enters a new second.

    ``creationTimestamp`` has second resolution: a pod created after this
    returns has a strictly later timestamp than one created before it was called.
    """
    start = int(time.time())
    poll(lambda: int(time.time()), lambda s: s > start, "next second", timeout=2.0)


def put_lab_pods(api: FakeKubeApi, lab: Lab, only: list[int] | None = None) -> None:
    """Publish the lab's pods (all, or those in ``only``) through the fake API."""
    items = lab.pod_list()["items"]
    for i, item in enumerate(items):
        if only is None or i in only:
            api.put(PODS, item)


def pod_key(lab: Lab, i: int) -> str:
    ident = lab.identities[i]
    return f"{ident.namespace}/{ident.name}"


def assert_names(r: Record, lab: Lab, i: int, attribution: str = "resolved") -> None:
    """``r`` is attributed to lab pod ``i`` as it is now (name, uid, namespace)."""
    ident = lab.identities[i]
    assert get(r, "flowlog.attribution") == attribution, r
    assert get(r, "kubernetes.pod.name") == ident.name, r
    assert get(r, "kubernetes.pod.uid") == ident.uid, r
    assert get(r, "kubernetes.namespace") == ident.namespace, r


# ---- fixtures ---------------------------------------------------------------------


@pytest.fixture
def api(lab: Lab) -> Iterator[FakeKubeApi]:
    """A fake API server knowing the lab's node (pods and Subnets are up to each test)."""
    fake = FakeKubeApi().start()
    try:
        fake.put(NODES, node(lab.node_name, [lab.node_ip4, lab.node_ip6]))
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def shipper(lab: Lab, api: FakeKubeApi, tmp_path: Path) -> Iterator[Factory]:
    """Start ``python -m shipper run`` fed by the fake API only (no pods file)."""
    started: list[ShipperProcess] = []
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api.url)

    def start(config: dict[str, Any] | None = None) -> ShipperProcess:
        cfg: dict[str, Any] = {
            "kubernetes.kubeconfig": str(kubeconfig),
            "kubernetes.in_cluster": "never",
            "kubernetes.sync_timeout_s": 30.0,
            "kubernetes.request_timeout_s": 5.0,
            "kubernetes.backoff_initial_s": 0.1,
            "kubernetes.backoff_max_s": 0.5,
        }
        cfg.update(config or {})
        tmp = tmp_path / f"s{len(started)}"
        tmp.mkdir()
        sp = ShipperProcess(lab, tmp, config=cfg, pods_file=False)
        started.append(sp)
        return sp

    try:
        yield start
    finally:
        for sp in started:
            with contextlib.suppress(Exception):  # stop every one, whatever happens
                sp.stop()


# ---- tests ------------------------------------------------------------------------


class TestPodIpReuse:
    """A pod deleted and its IP given to a new pod, all learnt through the watch."""

    @pytest.mark.parametrize("family", [4, 6])
    def test_flows_and_late_destroys_name_the_pod_that_owned_the_ip(
        self, lab: Lab, api: FakeKubeApi, shipper: Factory, family: int
    ) -> None:
        """Old and new flows from one IP, and both DESTROYs (the old one arriving after
        the old pod's deletion), name the pod that owned the IP when each flow started."""
        put_lab_pods(api, lab)
        sp = shipper()
        sp.wait_ready()
        wait_gauge(sp, "shipper_kube_cache_stale", 0, {"resource": "pods"})
        ip = lab.pod_ip(0, family)
        lab.start_server("tcp", 8080, family)
        lab.connect(0, "tcp", family, 8080, hold_s=HOLD_S)
        old = sp.wait_records(lambda r: is_new(r) and from_ip(ip)(r))[0]
        assert_names(old, lab, 0)
        pod_a = lab.identities[0]

        # Kubernetes deletes pod A ...
        api.delete(PODS, pod_key(lab, 0))
        sp.wait_metric("shipper_kube_events_total", 1, {"resource": "pods", "type": "DELETED"})
        wait_gauge(sp, "shipper_pods_live", 2)
        deleted_at = time.time()
        # ... and a second later hands its addresses to the new pod B.
        next_second()
        lab.reassign_ip(0)
        pod_b = lab.identities[0]
        assert pod_b.uid != pod_a.uid and pod_b.name != pod_a.name
        put_lab_pods(api, lab, only=[0])
        b_obj = api.objects(PODS)
        assert any(p["metadata"]["uid"] == pod_b.uid and p["metadata"]["creationTimestamp"]
                   > pod_a.created.strftime("%Y-%m-%dT%H:%M:%SZ") for p in b_obj)
        # DELETED was applied before ADDED (watch order), so 3 live pods means B is in.
        sp.wait_metric("shipper_kube_events_total", 1, {"resource": "pods", "type": "ADDED"})
        wait_gauge(sp, "shipper_pods_live", 3)

        lab.connect(0, "tcp", family, 8080, hold_s=HOLD_S)
        old_id = get(old, "conntrack.id")
        fresh = sp.wait_records(lambda r: is_new(r) and from_ip(ip)(r)
                                and get(r, "conntrack.id") != old_id)[0]
        assert_names(fresh, lab, 0)
        assert get(fresh, "kubernetes.pod.name") == pod_b.name

        # Both conntrack entries end now, long after A was deleted.
        ct_delete(lab, "-s", ip)
        ids = {old_id: pod_a, get(fresh, "conntrack.id"): pod_b}
        destroys = sp.wait_records(lambda r: get(r, "event.action") == "destroy"
                                   and get(r, "conntrack.id") in ids, n=2)
        assert len(destroys) == 2, destroys
        for d in destroys:
            want = ids[get(d, "conntrack.id")]
            assert get(d, "flowlog.attribution") == "resolved", d
            assert get(d, "kubernetes.pod.name") == want.name, d
            assert get(d, "kubernetes.pod.uid") == want.uid, d
            assert get(d, "source.ip") == ip
            assert datetime.fromisoformat(get(d, "event.end")).timestamp() > deleted_at
        assert sp.metric("shipper_records_unresolved_total") == 0


class TestSubnetDiscovery:
    """Pod CIDRs come from Kube-OVN Subnets watched at runtime, not from the config."""

    @pytest.mark.parametrize("kernel_filter", [True, False], ids=["bpf", "userspace"])
    def test_subnet_added_and_deleted_at_runtime_changes_what_is_shipped(
        self, lab: Lab, api: FakeKubeApi, shipper: Factory, kernel_filter: bool
    ) -> None:
        """Only sources in a natOutgoing Subnet are shipped; adding such a Subnet through the
        API ships its pods' new flows, deleting it stops them, without a restart. With the
        in-kernel filter the program is re-attached on each change (other sources never
        reach userspace); without it userspace counts them as source_not_pod."""
        put_lab_pods(api, lab)
        api.put(SUBNETS, subnet("join", "100.64.0.0/16", nat_outgoing=False))
        # Pod 0 (10.244.0.10) only.
        api.put(SUBNETS, subnet("team-a", "10.244.0.10/32"))
        # Pod 1 (10.244.0.11) is in a Subnet without natOutgoing: never a pod CIDR.
        api.put(SUBNETS, subnet("internal", "10.244.0.11/32", nat_outgoing=False))
        sp = shipper({"filter.pod_cidrs": [], "filter.cluster_cidrs": [],
                      "kubernetes.subnets_enabled": True,
                      "conntrack.kernel_filter": kernel_filter})
        sp.wait_ready()
        wait_gauge(sp, "shipper_kube_cidrs", 1, {"kind": "pod"})
        lab.start_server("tcp", 8080, 4)
        pod0, pod2 = lab.pod_ip(0, 4), lab.pod_ip(2, 4)

        def filtered() -> float:
            return sp.metric("shipper_events_filtered_total", {"reason": "source_not_pod"})

        def shipped_from(i: int) -> int:
            return len([r for r in sp.records() if from_ip(lab.pod_ip(i, 4))(r)])

        def assert_not_shipped(pods: list[int]) -> None:
            """New flows from ``pods`` are counted as filtered and never become records.

            A flow from pod 0 made afterwards is awaited: its record is written after
            any record for the earlier flows would have been.
            """
            base = filtered()
            before = {i: shipped_from(i) for i in pods}
            marker = len([r for r in sp.records() if is_new(r) and from_ip(pod0)(r)]) + 1
            for i in pods:
                lab.connect(i, "tcp", 4, 8080)
            lab.connect(0, "tcp", 4, 8080)
            rec = sp.wait_records(lambda r: is_new(r) and from_ip(pod0)(r), n=marker)[-1]
            assert_names(rec, lab, 0)
            if not kernel_filter:
                poll(filtered, lambda v: v >= base + len(pods), "source_not_pod count")
            assert {i: shipped_from(i) for i in pods} == before

        assert_not_shipped([1, 2])
        first = sp.wait_records(lambda r: is_new(r) and from_ip(pod0)(r))[0]
        assert get(first, "destination.ip") == lab.ext_ip4  # the ext host is no cluster CIDR

        # A natOutgoing Subnet for pod 2 (10.244.0.12-15) appears at runtime.
        api.put(SUBNETS, subnet("team-b", "10.244.0.12/30"))
        wait_gauge(sp, "shipper_kube_cidrs", 2, {"kind": "pod"})  # set after the filter swap
        lab.connect(2, "tcp", 4, 8080)
        rec = sp.wait_records(lambda r: is_new(r) and from_ip(pod2)(r))[0]
        assert_names(rec, lab, 2)
        assert_not_shipped([1])
        assert shipped_from(1) == 0

        # And it goes away again.
        api.delete(SUBNETS, "team-b")
        wait_gauge(sp, "shipper_kube_cidrs", 1, {"kind": "pod"})
        assert_not_shipped([2])
        assert sp.metric("shipper_events_filtered_total",
                         {"reason": "destination_in_cluster"}) == 0
        if kernel_filter:
            # At start (empty: keeps all), after the first Subnets, team-b added, removed.
            assert sp.stderr().count("in-kernel filter attached") >= 4


class TestApiOutage:
    """The API going away mid-run neither stops nor slows the event path."""

    @pytest.mark.parametrize("history", ["kept", "compacted"])
    def test_cache_serves_during_outage_and_recovers(
        self, lab: Lab, api: FakeKubeApi, shipper: Factory, history: str
    ) -> None:
        """With the hold off (enrich.stale_hold_s 0) and the API down, records keep coming
        within normal latency, naming the cached owner but flagged stale, and the stale
        gauges are 1; after the API returns the pods are re-listed (also when the server
        kept its history: a resumed watch never says when it has caught up), the gauges are
        0 and a pod IP reuse made during the outage is applied."""
        put_lab_pods(api, lab)
        sp = shipper({"enrich.stale_hold_s": 0})
        sp.wait_ready()
        wait_gauge(sp, "shipper_kube_cache_stale", 0, {"resource": "pods"})
        lab.start_server("tcp", 8080, 4)
        lab.connect(1, "tcp", 4, 8080)
        assert_names(sp.wait_records(is_new)[0], lab, 1)

        api.stop()
        wait_gauge(sp, "shipper_kube_cache_stale", 1, {"resource": "pods"})
        wait_gauge(sp, "shipper_kube_cache_stale", 1, {"resource": "nodes"})
        for round_ in range(2):
            for i in range(3):
                before = len([r for r in sp.records() if is_new(r)])
                t0 = time.monotonic()
                lab.connect(i, "tcp", 4, 8080)
                rec = sp.wait_records(is_new, n=before + 1, timeout=WAIT_S)[-1]
                latency = time.monotonic() - t0
                assert latency < MAX_LATENCY_S, (round_, i, latency)
                assert_names(rec, lab, i, attribution="stale")
        assert sp.proc.poll() is None
        assert sp.metric("shipper_records_unresolved_total") == 0
        sp.wait_metric("shipper_records_stale_total", 6, {"reason": "age"})
        assert metric_now(sp, "shipper_pod_source_stale") == 1
        assert sp.metric("shipper_kube_watch_restarts_total",
                         {"resource": "pods", "reason": "error"}) >= 1

        # While we cannot watch, pod 2 is deleted and its IP goes to a new pod.
        old2 = lab.identities[2]
        api.delete(PODS, pod_key(lab, 2))
        next_second()
        lab.reassign_ip(2)
        put_lab_pods(api, lab, only=[2])
        if history == "compacted":
            api.compact()

        api.start()
        wait_gauge(sp, "shipper_kube_cache_stale", 0, {"resource": "pods"})
        wait_gauge(sp, "shipper_kube_cache_stale", 0, {"resource": "nodes"})
        # A second full list, applied before it is counted, whatever the server kept.
        sp.wait_metric("shipper_kube_lists_total", 2, {"resource": "pods", "result": "ok"})
        wait_gauge(sp, "shipper_pod_source_stale", 0)
        assert sp.metric("shipper_pod_tombstones") >= 2  # the old pod's v4 and v6
        lab.connect(2, "tcp", 4, 8080)
        rec = sp.wait_records(lambda r: is_new(r) and from_ip(lab.pod_ip(2, 4))(r), n=3)[-1]
        assert_names(rec, lab, 2)
        assert get(rec, "kubernetes.pod.name") != old2.name
        assert sp.proc.poll() is None


class TestStartupSync:
    """At start the shipper waits (bounded) for the first lists before reading events."""

    @pytest.mark.parametrize("outage", ["refused", "http503"])
    def test_records_are_attributed_once_the_late_api_answers(
        self, lab: Lab, api: FakeKubeApi, shipper: Factory, outage: str
    ) -> None:
        """With the API down (connection refused, or answering 503) when the shipper starts,
        a flow older than the shipper (snapshot) and one made during the wait (NEW) are
        shipped attributed once the API comes back within sync_timeout_s."""
        put_lab_pods(api, lab)
        lab.start_server("tcp", 8080, 4)
        lab.connect(0, "tcp", 4, 8080, hold_s=HOLD_S)
        if outage == "refused":
            api.stop()
        else:
            api.fail_with = 503
        sp = shipper()
        # Subscribed to conntrack events, now waiting for the API.
        poll(sp.stderr, lambda s: "listening for conntrack events" in s, "subscribed")
        sp.wait_metric("shipper_kube_watch_restarts_total", 2,
                       {"resource": "pods", "reason": "error"})
        lab.connect(1, "tcp", 4, 8080)
        assert sp.records() == []
        assert "initial table dump" not in sp.stderr()
        assert metric_now(sp, "shipper_kube_cache_stale", {"resource": "pods"}) == 1

        if outage == "refused":
            api.start()
        else:
            api.fail_with = None
        sp.wait_ready()
        snap = sp.wait_records(lambda r: get(r, "event.action") == "snapshot"
                               and from_ip(lab.pod_ip(0, 4))(r))[0]
        assert_names(snap, lab, 0)
        new = sp.wait_records(lambda r: is_new(r) and from_ip(lab.pod_ip(1, 4))(r))[0]
        assert_names(new, lab, 1)
        assert all(get(r, "flowlog.attribution") == "resolved" for r in sp.records())
        assert "not listed within" not in sp.stderr()
        sp.wait_metric("shipper_records_total", 2)
        assert sp.metric("shipper_records_unresolved_total") == 0
        wait_gauge(sp, "shipper_kube_cache_stale", 0, {"resource": "pods"})

    def test_sync_timeout_ships_unresolved_then_attributes_when_api_returns(
        self, lab: Lab, api: FakeKubeApi, shipper: Factory
    ) -> None:
        """If the API stays down past sync_timeout_s the shipper starts anyway: records are
        held, then (past enrich.stale_hold_s) shipped flagged stale and counted - not
        "unresolved": nothing is known yet; once the API answers, new flows are attributed."""
        put_lab_pods(api, lab)
        lab.start_server("tcp", 8080, 4)
        lab.connect(0, "tcp", 4, 8080, hold_s=HOLD_S)
        api.stop()
        sp = shipper({"kubernetes.sync_timeout_s": 1.0, "enrich.stale_hold_s": 1.0})
        sp.wait_ready()
        assert "not listed within" in sp.stderr()
        snap = sp.wait_records(lambda r: get(r, "event.action") == "snapshot")[0]
        assert get(snap, "flowlog.attribution") == "stale"
        assert "kubernetes" not in snap
        sp.wait_metric("shipper_records_stale_total", 1, {"reason": "age"})
        assert sp.metric("shipper_records_unresolved_total") == 0
        assert metric_now(sp, "shipper_kube_cache_stale", {"resource": "pods"}) == 1

        api.start()
        wait_gauge(sp, "shipper_kube_cache_stale", 0, {"resource": "pods"})
        wait_gauge(sp, "shipper_pods_live", 3)
        lab.connect(1, "tcp", 4, 8080)
        new = sp.wait_records(lambda r: is_new(r) and from_ip(lab.pod_ip(1, 4))(r))[0]
        assert_names(new, lab, 1)

    def test_sigterm_during_startup_wait_exits_promptly(
        self, lab: Lab, api: FakeKubeApi, shipper: Factory
    ) -> None:
        """SIGTERM while waiting for an unreachable API stops the shipper within seconds."""
        api.stop()
        sp = shipper({"kubernetes.sync_timeout_s": 10.0})
        poll(sp.stderr, lambda s: "listening for conntrack events" in s, "subscribed")
        sp.wait_metric("shipper_kube_watch_restarts_total", 1,
                       {"resource": "pods", "reason": "error"})
        t0 = time.monotonic()
        code = sp.stop(signal.SIGTERM, timeout=30.0)
        elapsed = time.monotonic() - t0
        assert code == 0
        assert elapsed < 5.0, f"took {elapsed:.1f}s to stop"

    def test_probes_during_the_startup_wait(
        self, lab: Lab, api: FakeKubeApi, shipper: Factory
    ) -> None:
        """While the API does not answer: /readyz is 503 naming pod_sync (the socket is
        subscribed), and /healthz stays 200 "blocked" past health.stall_s (a bounded wait,
        not a stall)."""
        api.stop()
        sp = shipper({"kubernetes.sync_timeout_s": 60.0, "health.stall_s": 0.5})
        poll(sp.stderr, lambda s: "listening for conntrack events" in s, "subscribed")
        base = f"http://127.0.0.1:{sp.metrics_port}"
        code, body = poll(lambda: probe(base + "/healthz"),
                          lambda r: r[1].get("since_progress_s", 0) > 1.0, "wait past stall_s")
        assert code == 200 and body["status"] == "blocked", body
        assert "Kubernetes pod sync" in body["reason"]
        code, body = probe(base + "/readyz")
        assert code == 503
        assert body["conditions"]["subscribed"]["ok"] is True
        assert body["conditions"]["pod_sync"]["ok"] is False
        assert "not listed within" not in sp.stderr()  # no warning per wait slice

    def test_sigterm_during_startup_wait_ships_the_events_already_queued(
        self, lab: Lab, api: FakeKubeApi, shipper: Factory
    ) -> None:
        """Events the kernel queued on the socket while the shipper waited for the API are
        read and shipped on SIGTERM, not dropped unseen: flagged stale (the pods were never
        listed, so "unresolved" would claim more than is known) and naming no pod."""
        api.stop()
        sp = shipper({"kubernetes.sync_timeout_s": 60.0})
        poll(sp.stderr, lambda s: "listening for conntrack events" in s, "subscribed")
        lab.start_server("tcp", 8080, 4)
        ports = sorted(lab.connect(p, "tcp", 4, 8080) for p in (0, 1, 2))
        assert sp.records() == [], "events were read before the sync wait ended"
        assert sp.stop(signal.SIGTERM, timeout=30.0) == 0
        news = [r for r in sp.records() if is_new(r) and get(r, "destination.port") == 8080]
        assert sorted(get(r, "source.port") for r in news) == ports
        for r in news:
            assert get(r, "kubernetes.pod.name") is None
            assert get(r, "flowlog.attribution") == "stale"
        assert "events queued at stop were read and shipped" in sp.stderr()

# ---- issue 11: never a wrong name when pod metadata lags ------------------------------


def sport_of(r: Record) -> int:
    return int(get(r, "source.port"))


def readyz(sp: ShipperProcess) -> dict[str, Any]:
    """The body of the shipper's /readyz (200 or 503)."""
    url = f"http://127.0.0.1:{sp.metrics_port}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            body: dict[str, Any] = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read())
    return body


class TestHoldDuringOutage:
    """While the pod watch is down, records wait for the re-list instead of naming the
    cached (possibly former) owner."""

    @pytest.mark.parametrize("family", [4, 6])
    def test_ip_reuse_during_outage_names_every_flow_right(
        self, lab: Lab, api: FakeKubeApi, shipper: Factory, family: int
    ) -> None:
        """The API refuses connections and the open watch is cut; meanwhile pod A (which
        also connects during the outage) is deleted, pod B gets A's v4 and v6 addresses and
        makes 6 connections. After recovery every record of B's flows names B, every record
        of A's flows names A: zero wrong names, zero stale (the outage is far shorter than
        stale_hold_s), and every held record was released."""
        put_lab_pods(api, lab)
        sp = shipper()
        sp.wait_ready()
        wait_gauge(sp, "shipper_pod_source_stale", 0)
        ip = lab.pod_ip(0, family)
        lab.start_server("tcp", 8080, family)
        pod_a = lab.identities[0]
        expected: dict[int, str] = {}  # source port -> pod uid (what the lab did)
        expected[lab.connect(0, "tcp", family, 8080, hold_s=HOLD_S)] = pod_a.uid
        sp.wait_records(lambda r: is_new(r) and from_ip(ip)(r))

        api.stop()  # refuses connections, cuts the open watches
        wait_gauge(sp, "shipper_pod_source_stale", 1)
        expected[lab.connect(0, "tcp", family, 8080, hold_s=HOLD_S)] = pod_a.uid
        api.delete(PODS, pod_key(lab, 0))
        next_second()
        lab.reassign_ip(0)
        pod_b = lab.identities[0]
        put_lab_pods(api, lab, only=[0])
        # A pod starts running at least a second after its (second-resolution) creation
        # time: sandbox, CNI, container start. The index cuts a missed deletion there.
        next_second()
        for _ in range(6):
            expected[lab.connect(0, "tcp", family, 8080)] = pod_b.uid
        sp.wait_metric("shipper_records_held_total", 7)
        # Held, not shipped: only the NEW from before the outage is out.
        assert len([r for r in sp.records() if is_new(r) and from_ip(ip)(r)]) == 1

        api.start()
        wait_gauge(sp, "shipper_pod_source_stale", 0)
        news = sp.wait_records(lambda r: is_new(r) and from_ip(ip)(r), n=len(expected))
        mine = [r for r in sp.records() if from_ip(ip)(r)]
        assert {sport_of(r) for r in news} == set(expected)
        wrong = [r for r in mine if get(r, "kubernetes.pod.uid") != expected[sport_of(r)]]
        assert wrong == []
        assert all(get(r, "flowlog.attribution") == "resolved" for r in mine), mine
        assert sum(1 for r in news if get(r, "kubernetes.pod.name") == pod_b.name) == 6
        sp.wait_metric("shipper_records_released_total", 7)
        assert sp.metric("shipper_records_stale_total") == 0
        assert sp.metric("shipper_records_held_total") == sp.metric(
            "shipper_records_released_total")

    def test_outage_longer_than_the_bound_ships_stale_and_loses_nothing(
        self, lab: Lab, api: FakeKubeApi, shipper: Factory
    ) -> None:
        """Past enrich.stale_hold_s, held records ship flagged stale naming the last known
        owner and are counted; /readyz shows the stale state (still ready); every connection
        still has its record; after recovery new flows are resolved again."""
        put_lab_pods(api, lab)
        sp = shipper({"enrich.stale_hold_s": 1.5})
        sp.wait_ready()
        wait_gauge(sp, "shipper_pod_source_stale", 0)
        lab.start_server("tcp", 8080, 4)
        api.stop()
        wait_gauge(sp, "shipper_pod_source_stale", 1)
        ready = readyz(sp)
        assert ready["status"] == "ready", ready
        pods_info = ready["info"]["pods"]
        assert pods_info["stale"] is True, ready
        assert pods_info["sources"]["pods"]["stale"] is True
        assert pods_info["sources"]["pods"]["reason"]
        assert pods_info["sources"]["pods"]["stale_since_ns"] <= time.time_ns()
        ports = [lab.connect(1, "tcp", 4, 8080) for _ in range(3)]
        news = sp.wait_records(lambda r: is_new(r) and sport_of(r) in ports, n=3)
        for r in news:
            assert_names(r, lab, 1, attribution="stale")
        sp.wait_metric("shipper_records_stale_total", 3, {"reason": "age"})
        api.start()
        wait_gauge(sp, "shipper_pod_source_stale", 0)
        port = lab.connect(1, "tcp", 4, 8080)
        assert_names(sp.wait_records(lambda r: is_new(r) and sport_of(r) == port)[0], lab, 1)
        assert len([r for r in sp.records() if is_new(r) and from_ip(lab.pod_ip(1))(r)]) == 4


class TestResolveWait:
    """A pod's first connections can beat its watch event: its NEW waits for it."""

    def test_new_pod_with_a_late_added_event_is_named(
        self, lab: Lab, api: FakeKubeApi, shipper: Factory
    ) -> None:
        """The fake API delays the new pod's ADDED event by 1 s while the pod already
        connects: its NEW record names it (resolve_wait_s 2 s), it is counted as resolved
        after a wait, and a flow of another pod made meanwhile is not delayed behind it."""
        put_lab_pods(api, lab, only=[0, 1])
        sp = shipper()
        sp.wait_ready()
        wait_gauge(sp, "shipper_pods_live", 2)
        lab.start_server("tcp", 8080, 4)
        api.delay_events(1.0)
        put_lab_pods(api, lab, only=[2])
        t0 = time.monotonic()
        port = lab.connect(2, "tcp", 4, 8080)
        other = lab.connect(0, "tcp", 4, 8080)
        first_other = sp.wait_records(lambda r: is_new(r) and sport_of(r) == other)[0]
        assert_names(first_other, lab, 0)
        if time.monotonic() - t0 < 0.9:  # seen before the ADDED event could have arrived
            assert not [r for r in sp.records() if sport_of(r) == port]
        rec = sp.wait_records(lambda r: is_new(r) and sport_of(r) == port)[0]
        assert_names(rec, lab, 2)
        sp.wait_metric("shipper_records_waited_total", 1, {"result": "resolved"})
        assert sp.metric("shipper_records_unresolved_total") == 0
        assert sp.metric("shipper_records_uncertain_total") == 0


class TestKubeOvnAnnotations:
    """Kube-OVN's allocation annotations give ownership before status.podIPs exists."""

    def test_allocated_pod_without_pod_ips_owns_its_flows(
        self, lab: Lab, api: FakeKubeApi, shipper: Factory
    ) -> None:
        """A pod with `ovn.kubernetes.io/ip_address: "v4,v6"` and `allocated: "true"` but no
        status.podIPs yet owns its v4 and v6 flows; records say the address came from
        Kube-OVN (kubernetes.pod.ip_source)."""
        items = lab.pod_list()["items"]
        for i, item in enumerate(items):
            if i == 2:
                ann = item["metadata"]["annotations"]
                ann["ovn.kubernetes.io/ip_address"] = f"{lab.pod_ip(2, 4)},{lab.pod_ip(2, 6)}"
                ann["ovn.kubernetes.io/allocated"] = "true"
                item["status"] = {"phase": "Pending"}
            api.put(PODS, item)
        sp = shipper()
        sp.wait_ready()
        for family in (4, 6):
            lab.start_server("tcp", 8080, family)
            port = lab.connect(2, "tcp", family, 8080)

            def new_from_port(r: Record, p: int = port) -> bool:
                return is_new(r) and sport_of(r) == p

            rec = sp.wait_records(new_from_port)[0]
            assert_names(rec, lab, 2)
            assert get(rec, "kubernetes.pod.ip") == lab.pod_ip(2, family)
            assert get(rec, "kubernetes.pod.ip_source") == "kube-ovn"


class TestStalePodsFile:
    """The pods file source: unreadable or unparsable holds records like an API outage."""

    @pytest.mark.parametrize("breakage", ["unparsable", "unreadable"])
    def test_broken_pods_file_holds_records_until_it_loads(
        self, lab: Lab, tmp_path: Path, breakage: str
    ) -> None:
        """While the pods file cannot be parsed (or read), records are held, not shipped with
        the old view; once a good version is in place they ship resolved."""
        sp = ShipperProcess(lab, tmp_path, config={"enrich.stale_hold_s": 60.0})
        try:
            sp.wait_ready()
            wait_gauge(sp, "shipper_pod_source_stale", 0)
            good = sp.pods_file.read_bytes()
            if breakage == "unparsable":
                tmp = sp.pods_file.with_name("pods.json.tmp")
                tmp.write_bytes(b'{"kind": "List", "items": [')
                tmp.replace(sp.pods_file)
            else:
                sp.pods_file.unlink()
                sp.pods_file.mkdir()  # exists, but read() fails (EISDIR)
            wait_gauge(sp, "shipper_pod_source_stale", 1)
            lab.start_server("tcp", 8080, 4)
            port = lab.connect(0, "tcp", 4, 8080)
            sp.wait_metric("shipper_records_held_total", 1)
            assert [r for r in sp.records() if sport_of(r) == port] == []
            if breakage == "unreadable":
                sp.pods_file.rmdir()
            tmp = sp.pods_file.with_name("pods.json.tmp")
            tmp.write_bytes(good)
            tmp.replace(sp.pods_file)
            rec = sp.wait_records(lambda r: is_new(r) and sport_of(r) == port)[0]
            assert_names(rec, lab, 0)
            sp.wait_metric("shipper_records_released_total", 1)
        finally:
            sp.stop()
