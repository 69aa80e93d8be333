"""Tests for shipper.enrich.kube: list + watch against the fake API server."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypedDict

import pytest

from shipper.config import Config
from shipper.enrich.kube import KubeSource, kube_enabled, load_connection
from shipper.enrich.pod_index import PodIndex
from shipper.errors import EnrichError
from shipper.filters.cidr import CidrFilter
from shipper.metrics import Metrics
from shipper.record import parse_ip
from tests.fakes.kube_api import (
    NODES,
    PODS,
    SUBNETS,
    FakeKubeApi,
    node,
    pod,
    subnet,
    write_kubeconfig,
)

# No Kubernetes or proxy settings from the environment (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("no_ambient_kube")

WAIT_S = 10.0


def wait_for(pred: Callable[[], object], timeout: float = WAIT_S) -> None:
    """Poll ``pred`` until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.01)


def owner(index: PodIndex, ip: str, t_ns: int | None = None) -> str | None:
    fam, val = parse_ip(ip)
    meta = index.lookup(fam, val, time.time_ns() if t_ns is None else t_ns)
    return None if meta is None else meta.name


@pytest.fixture
def api() -> Iterator[FakeKubeApi]:
    fake = FakeKubeApi().start()
    try:
        yield fake
    finally:
        fake.stop()


class Harness:
    """A KubeSource wired to a fresh index, filter and metrics."""

    def __init__(self, api: FakeKubeApi, tmp_path: Path, *, node_name: str = "node-1",
                 health: Any = None, **kube: object) -> None:
        kc = write_kubeconfig(tmp_path / "kubeconfig", api.url)
        settings: dict[str, object] = {
            "kubeconfig": str(kc),
            "backoff_initial_s": 0.02,
            "backoff_max_s": 0.2,
            "watch_nodes": False,
        }
        settings.update(kube)
        filt: dict[str, object] = {}
        if not settings.get("subnets_enabled"):
            filt["pod_cidrs"] = ["10.16.0.0/16"]
        self.cfg = Config.model_validate(
            {"kubernetes": settings, "filter": filt, "node_name": node_name}
        )
        self.index = PodIndex()
        self.filter = CidrFilter(self.cfg.filter.pod_cidrs, self.cfg.filter.cluster_cidrs)
        self.metrics = Metrics()
        self.source = KubeSource(self.cfg, self.index, self.filter, self.metrics, health)

    def __enter__(self) -> Harness:
        self.source.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.source.stop()


@pytest.fixture
def make(api: FakeKubeApi, tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def factory(**kube: Any) -> Harness:
        h = Harness(api, tmp_path, **kube)
        made.append(h)
        return h

    yield factory
    for h in made:
        h.source.stop()


class TestKubeEnabled:
    def test_off_without_any_config(self) -> None:
        """No kubeconfig, no $KUBECONFIG, no service account: the API source is off."""
        assert kube_enabled(Config(filter={"pod_cidrs": ["10.0.0.0/8"]})) is False

    def test_on_with_kubeconfig_key(self, tmp_path: Path) -> None:
        """kubernetes.kubeconfig turns it on."""
        cfg = Config(filter={"pod_cidrs": ["10.0.0.0/8"]}, kubernetes={"kubeconfig": tmp_path})
        assert kube_enabled(cfg) is True

    def test_on_with_env(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        """$KUBECONFIG turns it on."""
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "k"))
        assert kube_enabled(Config(filter={"pod_cidrs": ["10.0.0.0/8"]})) is True

    def test_in_cluster_needs_token(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """KUBERNETES_SERVICE_HOST alone (no token file) does not turn it on."""
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
        from shipper.enrich import kube_detect

        monkeypatch.setattr(kube_detect, "SERVICE_ACCOUNT_DIR", Path("/nonexistent"))
        assert kube_enabled(Config(filter={"pod_cidrs": ["10.0.0.0/8"]})) is False


class TestLoadConnection:
    def test_bad_kubeconfig_raises_enrich_error(self, tmp_path: Path) -> None:
        """A missing or malformed kubeconfig is an EnrichError naming the file."""
        cfg = Config(
            filter={"pod_cidrs": ["10.0.0.0/8"]},
            kubernetes={"kubeconfig": tmp_path / "missing"},
        )
        with pytest.raises(EnrichError, match="missing"):
            load_connection(cfg)
        (tmp_path / "bad").write_text("clusters: 5\n")
        cfg = Config(
            filter={"pod_cidrs": ["10.0.0.0/8"]}, kubernetes={"kubeconfig": tmp_path / "bad"}
        )
        with pytest.raises(EnrichError):
            load_connection(cfg)

    def test_kubeconfig_server(self, api: FakeKubeApi, tmp_path: Path) -> None:
        """The fake's kubeconfig resolves to its URL."""
        kc = write_kubeconfig(tmp_path / "kc", api.url)
        cfg = Config(filter={"pod_cidrs": ["10.0.0.0/8"]}, kubernetes={"kubeconfig": kc})
        assert load_connection(cfg).cluster.server == api.url


class TestPodWatch:
    def test_initial_list_fills_index(self, api: FakeKubeApi, make: Callable[..., Harness]) -> None:
        """After wait_synced the listed pods resolve and the cache is not stale."""
        api.put(PODS, pod("a", ["10.16.0.5", "fd00::5"]))
        with make() as h:
            assert h.source.wait_synced(WAIT_S) is True
            assert owner(h.index, "10.16.0.5") == "a"
            assert owner(h.index, "fd00::5") == "a"
            assert h.source.stale is False
            assert h.metrics.value("shipper_kube_cache_stale", "pods") == 0

    def test_watch_events_applied(self, api: FakeKubeApi, make: Callable[..., Harness]) -> None:
        """ADDED, MODIFIED and DELETED events update the index without a re-list."""
        with make() as h:
            assert h.source.wait_synced(WAIT_S)
            api.put(PODS, pod("a", "10.16.0.5", labels={"v": "1"}))
            wait_for(lambda: owner(h.index, "10.16.0.5") == "a")
            api.put(PODS, pod("a", "10.16.0.5", labels={"v": "2"}))
            wait_for(lambda: h.index.live_pods() == 1 and _labels(h, "10.16.0.5") == {"v": "2"})
            before_delete = time.time_ns()
            api.delete(PODS, "default/a")
            wait_for(lambda: owner(h.index, "10.16.0.5") is None)
            assert owner(h.index, "10.16.0.5", before_delete) == "a"  # tombstone
            assert h.metrics.value("shipper_kube_lists_total", "pods", "ok") == 1
            assert h.metrics.value("shipper_kube_events_total", "pods", "DELETED") == 1

    def test_ip_reuse_attributed_by_time(
        self, api: FakeKubeApi, make: Callable[..., Harness]
    ) -> None:
        """A deleted pod's IP given to a new pod: earlier times resolve to the old pod."""
        with make() as h:
            assert h.source.wait_synced(WAIT_S)
            api.put(PODS, pod("old", "10.16.0.9"))
            wait_for(lambda: owner(h.index, "10.16.0.9") == "old")
            t_old = time.time_ns()
            api.delete(PODS, "default/old")
            api.put(PODS, pod("new", "10.16.0.9"))
            wait_for(lambda: owner(h.index, "10.16.0.9") == "new")
            assert owner(h.index, "10.16.0.9", t_old) == "old"

    def test_resume_from_last_resource_version(
        self, api: FakeKubeApi, make: Callable[..., Harness]
    ) -> None:
        """A watch that ends (server-side timeout) resumes from the last seen resourceVersion,
        without re-listing, and the pod view never counts as stale."""
        with make() as h:
            assert h.source.wait_synced(WAIT_S)
            stored = api.put(PODS, pod("a", "10.16.0.5"))
            wait_for(lambda: owner(h.index, "10.16.0.5") == "a")
            api.end_watches(PODS)
            wait_for(lambda: len(api.watch_requests(PODS)) >= 2)
            resumed = api.watch_requests(PODS)[-1]
            assert resumed["resourceVersion"] == stored["metadata"]["resourceVersion"]
            assert resumed["allowWatchBookmarks"] == "true"
            api.put(PODS, pod("b", "10.16.0.6"))
            wait_for(lambda: owner(h.index, "10.16.0.6") == "b")
            assert h.metrics.value("shipper_kube_lists_total", "pods", "ok") == 1
            assert h.source.pods_state.stale is False
            assert h.source.pods_state.recoveries == 1  # the first list only

    def test_cut_pods_watch_is_stale_until_relisted(
        self, api: FakeKubeApi, make: Callable[..., Harness]
    ) -> None:
        """A cut pods watch makes the pod view stale (with the time it began) and is followed
        by a re-list, not a resume: the view is fresh again only once the list is reconciled,
        so a deletion missed meanwhile is known from that moment."""
        api.put(PODS, pod("a", "10.16.0.5"))
        with make() as h:
            assert h.source.wait_synced(WAIT_S)
            state = h.source.pods_state
            assert state.stale is False and state.recoveries == 1
            wait_for(lambda: api.open_watches(PODS) == 1)
            api.stop()  # refuses connections and cuts the open watch
            t_cut = time.time_ns()
            wait_for(lambda: state.stale)
            assert state.stale_since_ns is not None and state.stale_since_ns <= time.time_ns()
            assert state.reason
            api.delete_quietly(PODS, "default/a")  # missed: no event will ever say so
            api.start()
            wait_for(lambda: not state.stale)
            assert h.metrics.value("shipper_kube_lists_total", "pods", "ok") == 2
            assert state.recovered_ns is not None and state.recovered_ns >= t_cut
            assert owner(h.index, "10.16.0.5") is None

    def test_bookmark_advances_resume_point(
        self, api: FakeKubeApi, make: Callable[..., Harness]
    ) -> None:
        """A BOOKMARK moves the resume resourceVersion even with no pod changes."""
        with make() as h:
            assert h.source.wait_synced(WAIT_S)
            wait_for(lambda: api.open_watches(PODS) == 1)
            api.put(NODES, node("n1", "172.18.0.2"))  # bumps the global version only
            api.bookmark()
            wait_for(lambda: h.metrics.value("shipper_kube_events_total", "pods", "BOOKMARK") == 1)
            api.drop_connections()
            wait_for(lambda: len(api.watch_requests(PODS)) >= 2)
            assert api.watch_requests(PODS)[-1]["resourceVersion"] == str(api.resource_version)

    @pytest.mark.parametrize("as_http", [False, True])
    def test_gone_relists_and_tombstones_missed_deletes(
        self, as_http: bool, tmp_path: Path
    ) -> None:
        """On 410 (ERROR event or HTTP status) the pods are re-listed and reconciled:
        a pod deleted while the watch was down becomes a tombstone, not a ghost."""
        fake = FakeKubeApi(gone_as_http=as_http).start()
        h = Harness(fake, tmp_path)
        try:
            fake.put(PODS, pod("ghost", "10.16.0.7"))
            fake.put(PODS, pod("stays", "10.16.0.8"))
            h.source.start()
            assert h.source.wait_synced(WAIT_S)
            # The 410 must reach an open watch (the watch opens just after the list).
            wait_for(lambda: fake.open_watches(PODS) == 1)
            t_alive = time.time_ns()
            if as_http:
                # An event first, so the watch counts as healthy when it ends normally.
                fake.put(PODS, pod("other", "10.16.0.9"))
                wait_for(lambda: owner(h.index, "10.16.0.9") == "other")
            fake.delete_quietly(PODS, "default/ghost")
            if as_http:
                fake.end_watches(PODS)  # its resume then gets HTTP 410
            else:
                fake.gone(PODS)
            wait_for(lambda: h.metrics.value("shipper_kube_lists_total", "pods", "ok") >= 2)
            assert owner(h.index, "10.16.0.7") is None
            assert owner(h.index, "10.16.0.7", t_alive) == "ghost"
            assert owner(h.index, "10.16.0.8") == "stays"
            assert h.metrics.value("shipper_kube_watch_restarts_total", "pods", "gone") >= 1
        finally:
            h.source.stop()
            fake.stop()

    def test_expired_continue_token_restarts_list(
        self, api: FakeKubeApi, make: Callable[..., Harness]
    ) -> None:
        """A paged list whose continue token expires (410) starts over, with backoff."""
        for i in range(5):
            api.put(PODS, pod(f"p{i}", f"10.16.1.{i}"))
        api.expired_continue = True
        with make(list_page_size=2) as h:
            gone = ("shipper_kube_watch_restarts_total", "pods", "gone")
            wait_for(lambda: h.metrics.value(*gone) >= 2)
            assert not h.source.wait_synced(0)
            api.expired_continue = False
            assert h.source.wait_synced(WAIT_S)
            assert h.index.live_pods() == 5

    def test_outage_keeps_cache_and_flags_stale(
        self, api: FakeKubeApi, make: Callable[..., Harness]
    ) -> None:
        """With the API gone the cache keeps serving and is flagged stale; it recovers after."""
        api.put(PODS, pod("a", "10.16.0.5"))
        with make() as h:
            assert h.source.wait_synced(WAIT_S)
            api.stop()
            wait_for(lambda: h.source.stale)
            assert h.metrics.value("shipper_kube_cache_stale", "pods") == 1
            t0 = time.perf_counter()
            for _ in range(1000):
                assert owner(h.index, "10.16.0.5") == "a"
            assert time.perf_counter() - t0 < 0.5  # lookups never wait for the API
            api.put(PODS, pod("b", "10.16.0.6"))  # changed while we could not watch
            api.start()
            wait_for(lambda: owner(h.index, "10.16.0.6") == "b")
            wait_for(lambda: not h.source.stale)
            assert h.metrics.value("shipper_kube_watch_restarts_total", "pods", "error") >= 1

    def test_wait_synced_bounded_when_api_down(
        self, api: FakeKubeApi, make: Callable[..., Harness]
    ) -> None:
        """wait_synced returns False after its timeout when the API is unreachable."""
        h = make()
        api.stop()
        with h:
            t0 = time.monotonic()
            assert h.source.wait_synced(0.3) is False
            assert time.monotonic() - t0 < 2.0
            assert h.source.stale is True

    def test_stop_is_bounded_during_open_watch(
        self, api: FakeKubeApi, make: Callable[..., Harness]
    ) -> None:
        """stop() interrupts blocked watch reads and joins quickly."""
        h = make(subnets_enabled=True, watch_nodes=True).__enter__()
        assert h.source.wait_synced(WAIT_S)
        wait_for(lambda: api.open_watches() == 3)
        t0 = time.monotonic()
        h.source.stop()
        assert time.monotonic() - t0 < 2.0
        assert all(not r._thread.is_alive() for r in h.source.reflectors if r._thread)

    def test_invalid_objects_counted_not_fatal(
        self, api: FakeKubeApi, make: Callable[..., Harness]
    ) -> None:
        """A malformed pod is skipped and counted; the others still resolve."""
        bad = pod("bad", "10.16.0.99")
        bad["status"]["podIPs"] = [{"ip": "not-an-ip"}]
        api.put(PODS, bad)
        api.put(PODS, pod("good", "10.16.0.5"))
        with make() as h:
            assert h.source.wait_synced(WAIT_S)
            assert owner(h.index, "10.16.0.5") == "good"
            assert h.metrics.value("shipper_kube_objects_invalid_total", "pods") == 1
            api.put(PODS, bad)
            wait_for(lambda: h.metrics.value("shipper_kube_objects_invalid_total", "pods") == 2)

    def test_label_policy_applied(self, api: FakeKubeApi, tmp_path: Path) -> None:
        """enrich.label_allowlist filters the labels of watched pods."""
        api.put(PODS, pod("a", "10.16.0.5", labels={"app": "x", "secret": "y"}))
        kc = write_kubeconfig(tmp_path / "kc", api.url)
        cfg = Config.model_validate(
            {
                "filter": {"pod_cidrs": ["10.16.0.0/16"]},
                "enrich": {"label_allowlist": ["app"]},
                "kubernetes": {"kubeconfig": str(kc), "watch_nodes": False},
            }
        )
        index = PodIndex()
        src = KubeSource(cfg, index, CidrFilter(["10.16.0.0/16"], []), Metrics())
        src.start()
        try:
            assert src.wait_synced(WAIT_S)
            fam, ip = parse_ip("10.16.0.5")
            meta = index.lookup(fam, ip, time.time_ns())
            assert meta is not None and meta.labels == {"app": "x"}
        finally:
            src.stop()


def _labels(h: Harness, ip: str) -> dict[str, str] | None:
    fam, val = parse_ip(ip)
    meta = h.index.lookup(fam, val, time.time_ns())
    return None if meta is None else meta.labels


class TestSubnetDiscovery:
    def test_subnets_and_nodes_set_cidrs(
        self, api: FakeKubeApi, make: Callable[..., Harness]
    ) -> None:
        """Subnets give pod/cluster CIDRs, nodes and service CIDRs are excluded destinations."""
        api.put(SUBNETS, subnet("ovn-default", "10.16.0.0/16,fd00:10:16::/64"))
        api.put(SUBNETS, subnet("join", "100.64.0.0/16", nat_outgoing=False))
        api.put(SUBNETS, subnet("private", "10.200.0.0/16", nat_outgoing=False))
        api.put(NODES, node("n1", "172.18.0.2"))
        with make(subnets_enabled=True, watch_nodes=True, service_cidrs=["10.96.0.0/12"]) as h:
            assert h.source.wait_synced(WAIT_S)
            wait_for(lambda: "172.18.0.2/32" in h.filter.cluster_cidrs)
            assert h.filter.pod_cidrs == ("10.16.0.0/16", "fd00:10:16::/64")
            assert set(h.filter.cluster_cidrs) >= {
                "10.16.0.0/16",
                "100.64.0.0/16",
                "10.200.0.0/16",
                "10.96.0.0/12",
                "fd00:10:16::/64",
            }

    def test_subnet_added_at_runtime(self, api: FakeKubeApi, make: Callable[..., Harness]) -> None:
        """A Subnet added, changed or deleted at runtime changes the filter without a restart."""
        with make(subnets_enabled=True) as h:
            assert h.source.wait_synced(WAIT_S)
            assert h.filter.pod_cidrs == ()
            api.put(SUBNETS, subnet("team-a", "10.20.0.0/24"))
            wait_for(lambda: h.filter.pod_cidrs == ("10.20.0.0/24",))
            api.put(SUBNETS, subnet("team-a", "10.20.0.0/24", nat_outgoing=False))
            wait_for(lambda: h.filter.pod_cidrs == ())
            assert "10.20.0.0/24" in h.filter.cluster_cidrs
            api.delete(SUBNETS, "team-a")
            wait_for(lambda: "10.20.0.0/24" not in h.filter.cluster_cidrs)

    def test_static_cidrs_win(self, api: FakeKubeApi, tmp_path: Path) -> None:
        """Hand-set pod CIDRs replace the discovered ones; static cluster CIDRs add to them."""
        api.put(SUBNETS, subnet("ovn-default", "10.16.0.0/16"))
        kc = write_kubeconfig(tmp_path / "kc", api.url)
        cfg = Config.model_validate(
            {
                "filter": {"pod_cidrs": ["192.168.50.0/24"], "cluster_cidrs": ["10.200.0.0/16"]},
                "kubernetes": {"kubeconfig": str(kc), "subnets_enabled": True,
                               "watch_nodes": False},
            }
        )
        filt = CidrFilter(cfg.filter.pod_cidrs, cfg.filter.cluster_cidrs)
        src = KubeSource(cfg, PodIndex(), filt, Metrics())
        src.start()
        try:
            assert src.wait_synced(WAIT_S)
            assert filt.pod_cidrs == ("192.168.50.0/24",)
            assert set(filt.cluster_cidrs) == {"10.16.0.0/16", "10.200.0.0/16"}
        finally:
            src.stop()

    def test_nat_policy_exposed(self, api: FakeKubeApi, make: Callable[..., Harness]) -> None:
        """natOutgoingPolicyRules are compiled and exposed as KubeSource.nat_policy."""
        rules = [{"action": "forward", "match": {"srcIPs": "10.16.0.0/30"}},
                 {"action": "forward", "match": {"dstIPs": "8.8.8.8"}}]
        api.put(SUBNETS, subnet("ovn-default", "10.16.0.0/16", rules=rules))
        with make(subnets_enabled=True) as h:
            assert h.source.wait_synced(WAIT_S)
            policy = h.source.nat_policy
            assert policy
            src = parse_ip("10.16.5.5")[1]
            assert policy.forwards(4, src, parse_ip("8.8.8.8")[1]) is True
            assert policy.forwards(4, src, parse_ip("1.1.1.1")[1]) is False
            assert "10.16.0.0/30" not in h.filter.pod_cidrs
            assert not h.filter.is_pod_ip(4, parse_ip("10.16.0.1")[1])
            assert h.filter.is_pod_ip(4, src)

    def test_nat_policy_published_to_the_filter(
        self, api: FakeKubeApi, make: Callable[..., Harness]
    ) -> None:
        """The compiled natOutgoingPolicyRules reach the CIDR filter with the CIDRs, and a
        rule change is published even when the CIDRs stay the same."""
        api.put(SUBNETS, subnet("ovn-default", "10.16.0.0/16", rules=[
            {"action": "forward", "match": {"dstIPs": "8.8.8.8"}}]))
        with make(subnets_enabled=True) as h:
            assert h.source.wait_synced(WAIT_S)
            wait_for(lambda: h.filter.nat_policy is not None)
            src = parse_ip("10.16.5.5")[1]
            policy = h.filter.nat_policy
            assert policy is not None  # (wait_for saw it set)
            assert policy.forwards(4, src, parse_ip("8.8.8.8")[1]) is True
            api.put(SUBNETS, subnet("ovn-default", "10.16.0.0/16", rules=[
                {"action": "forward", "match": {"dstIPs": "1.1.1.1"}}]))
            wait_for(lambda: h.filter.nat_policy is not None
                     and h.filter.nat_policy.forwards(4, src, parse_ip("1.1.1.1")[1]))
            assert h.filter.pod_cidrs == ("10.16.0.0/16",)

    def test_invalid_subnet_counted(self, api: FakeKubeApi, make: Callable[..., Harness]) -> None:
        """A Subnet with a bad cidrBlock is skipped and counted; others still apply."""
        api.put(SUBNETS, subnet("bad", "10.300.0.0/16"))
        api.put(SUBNETS, subnet("good", "10.16.0.0/16"))
        with make(subnets_enabled=True) as h:
            assert h.source.wait_synced(WAIT_S)
            assert h.filter.pod_cidrs == ("10.16.0.0/16",)
            assert h.metrics.value("shipper_kube_objects_invalid_total", "subnets") == 1


# ---- node role and pod watch scope ---------------------------------------------------


class FakeHealth:
    """Records set_info calls (the contract of shipper.health.Health)."""

    def __init__(self) -> None:
        self.info: dict[str, Any] = {}

    def set_info(self, key: str, value: Any) -> None:
        self.info[key] = value


def pod_lists(api: FakeKubeApi) -> list[dict[str, str]]:
    """Query parameters of every pod list request (first pages), in order."""
    return [q for p, q in list(api.requests)
            if p == PODS and q.get("watch") not in ("1", "true") and "continue" not in q]


def live_names(h: Harness, ips: dict[str, str]) -> set[str]:
    return {name for name, ip in ips.items() if owner(h.index, ip) == name}


class GatewayArgs(TypedDict, total=False):
    """Keyword arguments of ``subnet`` for a Subnet's gateway."""

    gateway_type: str
    gateway_node: str


CENTRAL = GatewayArgs(gateway_type="centralized", gateway_node="node-1:172.18.0.9,node-3")
PODS_3 = {"a1": ("10.16.0.11", "node-1"), "b1": ("10.16.0.21", "node-2"),
          "c1": ("10.16.0.31", "node-3")}


def put_pods(api: FakeKubeApi) -> dict[str, str]:
    for name, (ip, nd) in PODS_3.items():
        api.put(PODS, pod(name, ip, node=nd))
    return {name: ip for name, (ip, _) in PODS_3.items()}


class TestFakeFieldSelector:
    def test_list_and_watch_filtered(self, api: FakeKubeApi) -> None:
        """The fake answers fieldSelector=spec.nodeName on lists, and 400 for unknown fields."""
        import httpx2 as httpx

        put_pods(api)
        with httpx.Client(base_url=api.url) as c:
            body = c.get(PODS, params={"fieldSelector": "spec.nodeName=node-2"}).json()
            assert [i["metadata"]["name"] for i in body["items"]] == ["b1"]
            body = c.get(PODS, params={"fieldSelector": "spec.nodeName!=node-2"}).json()
            assert sorted(i["metadata"]["name"] for i in body["items"]) == ["a1", "c1"]
            bad = c.get(PODS, params={"fieldSelector": "spec.bogus=x"})
            assert bad.status_code == 400 and "field label not supported" in bad.text

    def test_watch_sees_object_leaving_selector_as_deleted(self, api: FakeKubeApi) -> None:
        """An object that stops matching arrives as DELETED, one that starts as ADDED."""
        import httpx2 as httpx
        import orjson

        api.put(PODS, pod("p", None, node=""))
        rv = api.resource_version
        api.put(PODS, pod("p", "10.16.0.5", node="node-1"))  # bound: now matches
        api.put(PODS, pod("q", "10.16.0.6", node="node-2"))  # never matches
        api.delete(PODS, "default/p")
        params = {"watch": "1", "resourceVersion": str(rv), "timeoutSeconds": "1",
                  "fieldSelector": "spec.nodeName=node-1"}
        with httpx.Client(base_url=api.url, timeout=5) as c:
            lines = [orjson.loads(x) for x in c.get(PODS, params=params).text.splitlines() if x]
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in lines] == [
            ("ADDED", "p"), ("DELETED", "p")]


class TestNodeRoleAndScope:
    def test_node_scope_watches_own_pods_only(
        self, api: FakeKubeApi, make: Callable[..., Harness]
    ) -> None:
        """Distributed only: list and watch carry fieldSelector=spec.nodeName=<node>; only own
        pods are cached; the role is in metrics and health."""
        api.put(SUBNETS, subnet("ovn-default", "10.16.0.0/16"))
        ips = put_pods(api)
        health = FakeHealth()
        with make(subnets_enabled=True, health=health) as h:
            assert h.source.wait_synced(WAIT_S)
            assert live_names(h, ips) == {"a1"}
            assert pod_lists(api)[-1]["fieldSelector"] == "spec.nodeName=node-1"
            wait_for(lambda: api.watch_requests(PODS))
            assert api.watch_requests(PODS)[-1]["fieldSelector"] == "spec.nodeName=node-1"
            assert h.metrics.value("shipper_node_role", "ovn-default", "distributed") == 1
            assert h.metrics.value("shipper_kube_pod_scope", "node") == 1
            info = health.info["node_role"]
            assert info["pod_scope"] == "node" and info["filter"] == "node role"
            assert info["subnets"] == [{"name": "ovn-default", "mode": "distributed",
                                        "cidrs": ["10.16.0.0/16"]}]

    def test_gateway_watches_every_pod(
        self, api: FakeKubeApi, make: Callable[..., Harness]
    ) -> None:
        """A gateway named "node-1:ip" in a centralized Subnet watches all pods (no selector)."""
        api.put(SUBNETS, subnet("ovn-default", "10.16.0.0/16", **CENTRAL))
        ips = put_pods(api)
        with make(subnets_enabled=True) as h:
            assert h.source.wait_synced(WAIT_S)
            assert live_names(h, ips) == {"a1", "b1", "c1"}
            assert "fieldSelector" not in pod_lists(api)[-1]
            assert h.filter.pod_cidrs == ("10.16.0.0/16",)
            role = h.source.node_role
            assert role is not None and role.entries[0].egress_ip == "172.18.0.9"

    def test_non_gateway_of_centralized_subnet(
        self, api: FakeKubeApi, make: Callable[..., Harness]
    ) -> None:
        """node-2 is no gateway of the centralized Subnet: its CIDR is not kept, own pods only."""
        api.put(SUBNETS, subnet("ovn-default", "10.16.0.0/16", **CENTRAL))
        api.put(SUBNETS, subnet("snat", "172.22.0.0/16"))
        ips = put_pods(api)
        with make(subnets_enabled=True, node_name="node-2") as h:
            assert h.source.wait_synced(WAIT_S)
            assert h.filter.pod_cidrs == ("172.22.0.0/16",)
            assert "10.16.0.0/16" in h.filter.cluster_cidrs
            assert live_names(h, ips) == {"b1"}

    def test_scope_switches_at_runtime_and_keeps_history(
        self, api: FakeKubeApi, make: Callable[..., Harness]
    ) -> None:
        """Becoming a gateway re-lists every pod; ceasing to be one re-lists own pods, and the
        other nodes' pods keep their history up to the switch (closed, never reassigned)."""
        api.put(SUBNETS, subnet("ovn-default", "10.16.0.0/16"))
        ips = put_pods(api)
        with make(subnets_enabled=True) as h:
            assert h.source.wait_synced(WAIT_S)
            assert live_names(h, ips) == {"a1"}
            api.put(SUBNETS, subnet("ovn-default", "10.16.0.0/16", **CENTRAL))
            wait_for(lambda: live_names(h, ips) == {"a1", "b1", "c1"})
            assert "fieldSelector" not in pod_lists(api)[-1]
            assert h.metrics.value("shipper_kube_pod_scope", "cluster") == 1
            assert h.metrics.value("shipper_node_role", "ovn-default", "centralized") == 1
            assert ("ovn-default", "distributed") not in h.metrics.values["shipper_node_role"]
            assert h.metrics.value("shipper_kube_watch_restarts_total", "pods", "scope") == 1
            t_gateway = time.time_ns()
            api.put(SUBNETS, subnet("ovn-default", "10.16.0.0/16"))  # distributed again
            wait_for(lambda: live_names(h, ips) == {"a1"})
            assert pod_lists(api)[-1]["fieldSelector"] == "spec.nodeName=node-1"
            # b1 owned its address while this node was its gateway: still attributed then.
            assert owner(h.index, ips["b1"], t_gateway) == "b1"
            # Events after the narrowing keep flowing for own pods.
            api.put(PODS, pod("a2", "10.16.0.12", node="node-1"))
            api.put(PODS, pod("b2", "10.16.0.22", node="node-2"))
            wait_for(lambda: owner(h.index, "10.16.0.12") == "a2")
            assert owner(h.index, "10.16.0.22") is None
            assert h.index.live_pods() == 2

    @pytest.mark.parametrize("gateway", [False, True], ids=["node-scope", "gateway"])
    def test_pod_moved_to_another_node_keeps_its_history(
        self, api: FakeKubeApi, make: Callable[..., Harness], gateway: bool
    ) -> None:
        """A StatefulSet pod recreated on another node with the same address: flows that
        started before the move still name the old pod; after it, a node-scoped shipper
        names nobody (it cannot see the new pod) and a gateway names the new one."""
        extra: GatewayArgs = CENTRAL if gateway else {}
        api.put(SUBNETS, subnet("ovn-default", "10.16.0.0/16", **extra))
        api.put(PODS, pod("web-0", "10.16.0.50", node="node-1", uid="old-uid"))
        with make(subnets_enabled=True) as h:
            assert h.source.wait_synced(WAIT_S)
            wait_for(lambda: owner(h.index, "10.16.0.50") == "web-0")
            before = time.time_ns()
            api.delete(PODS, "default/web-0")
            wait_for(lambda: owner(h.index, "10.16.0.50") is None)
            api.put(PODS, pod("web-0", "10.16.0.50", node="node-2", uid="new-uid"))
            api.put(PODS, pod("marker", "10.16.0.51", node="node-1"))
            wait_for(lambda: owner(h.index, "10.16.0.51") == "marker")
            fam, ip = parse_ip("10.16.0.50")
            old = h.index.lookup(fam, ip, before)
            assert old is not None and old.uid == "old-uid"
            now = h.index.lookup(fam, ip, time.time_ns())
            assert (now.uid if now else None) == ("new-uid" if gateway else None)

    def test_gone_in_node_scope_relists_with_selector(
        self, api: FakeKubeApi, make: Callable[..., Harness]
    ) -> None:
        """A 410 in node scope re-lists with the same fieldSelector."""
        api.put(SUBNETS, subnet("ovn-default", "10.16.0.0/16"))
        put_pods(api)
        with make(subnets_enabled=True) as h:
            assert h.source.wait_synced(WAIT_S)
            wait_for(lambda: api.open_watches(PODS) == 1)
            api.gone(PODS)
            wait_for(lambda: len(pod_lists(api)) >= 2)
            assert all(q["fieldSelector"] == "spec.nodeName=node-1" for q in pod_lists(api))

    def test_gateway_by_node_labels(
        self, api: FakeKubeApi, make: Callable[..., Harness]
    ) -> None:
        """gatewayNodeSelectors match this node's labels (from the Node watch); a label change
        at runtime changes the role and the scope."""
        sel = [{"matchLabels": {"kube-ovn/role": "gateway"}}]
        api.put(SUBNETS, subnet("ovn-default", "10.16.0.0/16", gateway_type="centralized",
                                gateway_node_selectors=sel))
        api.put(NODES, node("node-1", "172.18.0.2", labels={"kube-ovn/role": "gateway"}))
        api.put(NODES, node("node-2", "172.18.0.3"))
        ips = put_pods(api)
        with make(subnets_enabled=True, watch_nodes=True) as h:
            assert h.source.wait_synced(WAIT_S)
            assert live_names(h, ips) == {"a1", "b1", "c1"}
            api.put(NODES, node("node-1", "172.18.0.2", labels={}))
            wait_for(lambda: h.filter.pod_cidrs == ())
            wait_for(lambda: pod_lists(api)[-1].get("fieldSelector") == "spec.nodeName=node-1")
            wait_for(lambda: live_names(h, ips) == {"a1"})

    def test_own_node_watched_when_nodes_are_not(
        self, api: FakeKubeApi, make: Callable[..., Harness]
    ) -> None:
        """With watch_nodes off, only this Node is read (fieldSelector=metadata.name=<node>)."""
        sel = [{"matchExpressions": [{"key": "egress", "operator": "Exists"}]}]
        api.put(SUBNETS, subnet("ovn-default", "10.16.0.0/16", gateway_type="centralized",
                                gateway_node_selectors=sel))
        api.put(NODES, node("node-1", "172.18.0.2", labels={"egress": ""}))
        api.put(NODES, node("node-2", "172.18.0.3"))
        with make(subnets_enabled=True, watch_nodes=False) as h:
            assert h.source.wait_synced(WAIT_S)
            node_reqs = [q for p, q in list(api.requests) if p == NODES]
            assert node_reqs and all(
                q["fieldSelector"] == "metadata.name=node-1" for q in node_reqs)
            role = h.source.node_role
            assert role is not None and role.gateway
            assert "172.18.0.3/32" not in h.filter.cluster_cidrs

    def test_fixed_node_scope_on_gateway_warns(
        self, api: FakeKubeApi, make: Callable[..., Harness],
        caplog: pytest.LogCaptureFixture
    ) -> None:
        """pod_scope node on a centralized gateway is kept as set, with a warning."""
        api.put(SUBNETS, subnet("ovn-default", "10.16.0.0/16", **CENTRAL))
        with caplog.at_level("WARNING", logger="shipper.kube"), \
                make(subnets_enabled=True, pod_scope="node") as h:
            assert h.source.wait_synced(WAIT_S)
            assert pod_lists(api)[-1]["fieldSelector"] == "spec.nodeName=node-1"
            wait_for(lambda: "pod_scope is node" in caplog.text)

    @pytest.mark.parametrize(("scope", "selector"),
                             [("node", "spec.nodeName=node-1"), ("cluster", None)])
    def test_fixed_scope(self, api: FakeKubeApi, make: Callable[..., Harness],
                         scope: str, selector: str | None) -> None:
        """pod_scope node/cluster is used as set, also without Subnets."""
        put_pods(api)
        with make(pod_scope=scope) as h:
            assert h.source.wait_synced(WAIT_S)
            assert pod_lists(api)[-1].get("fieldSelector") == selector

    def test_hand_set_pod_cidrs_reported_as_winning(
        self, api: FakeKubeApi, tmp_path: Path
    ) -> None:
        """With filter.pod_cidrs set, the filter keeps them; /readyz says the hand setting wins."""
        api.put(SUBNETS, subnet("ovn-default", "10.16.0.0/16", **CENTRAL))
        kc = write_kubeconfig(tmp_path / "kc", api.url)
        cfg = Config.model_validate({
            "node_name": "node-2", "filter": {"pod_cidrs": ["10.16.0.0/16"]},
            "kubernetes": {"kubeconfig": str(kc), "subnets_enabled": True, "watch_nodes": False},
        })
        filt = CidrFilter(cfg.filter.pod_cidrs, cfg.filter.cluster_cidrs)
        health = FakeHealth()
        src = KubeSource(cfg, PodIndex(), filt, Metrics(), health)
        src.start()
        try:
            assert src.wait_synced(WAIT_S)
            assert filt.pod_cidrs == ("10.16.0.0/16",)
            assert health.info["node_role"]["subnets"] == []
            assert health.info["node_role"]["filter"] == "filter.pod_cidrs (set by hand)"
        finally:
            src.stop()


class TestCheckConfigRole:
    def test_prints_role_of_this_node(
        self, api: FakeKubeApi, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """check-config --kubeconfig prints the role the named node would have (seed cluster)."""
        from shipper import cli

        api.put(SUBNETS, subnet("central", "192.101.0.0/16", gateway_type="distributed"))
        api.put(SUBNETS, subnet("join", "100.64.0.0/16", nat_outgoing=False))
        api.put(SUBNETS, subnet("ovn-default", "10.16.0.0/16", gateway_type="centralized",
                                gateway_node="ovn1:192.168.137.176", activate_gateway="ovn1"))
        api.put(SUBNETS, subnet("snat", "172.22.0.0/16"))
        api.put(NODES, node("ovn1", "192.168.137.176"))
        kc = write_kubeconfig(tmp_path / "kc", api.url)
        conf = tmp_path / "c.yaml"
        conf.write_text("kubernetes: {subnets_enabled: true}\n", encoding="utf-8")
        rc = cli.main(["check-config", "-c", str(conf), "--kubeconfig", str(kc),
                       "--node-name", "ovn1"])
        out, err = capsys.readouterr()
        assert rc == 0 and '"subnets_enabled": true' in out
        assert "node role of ovn1 (from 4 Subnets)" in err
        assert "ovn-default: centralized 10.16.0.0/16 active egress 192.168.137.176" in err
        assert "snat: distributed 172.22.0.0/16" in err and "join" not in err
        assert "pod watch scope: cluster" in err
        rc = cli.main(["check-config", "-c", str(conf), "--kubeconfig", str(kc),
                       "--node-name", "ovn2"])
        _, err = capsys.readouterr()
        assert "ovn-default" not in err and "pod watch scope: node" in err
        assert "no Node named 'ovn2'" in err

    def test_api_unreachable_exits_2(
        self, api: FakeKubeApi, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """When the role cannot be read, check-config says why and exits 2."""
        from shipper import cli

        api.fail_with = 403
        kc = write_kubeconfig(tmp_path / "kc", api.url)
        rc = cli.main(["check-config", "--pod-cidr", "10.16.0.0/16", "--kubeconfig", str(kc)])
        _, err = capsys.readouterr()
        assert rc == 2 and "node role: cannot be read" in err and "403" in err
