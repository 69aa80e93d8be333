"""Health: the /healthz heartbeat, /readyz conditions, and serving them beside /metrics."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from shipper.health import Health
from shipper.metrics import Metrics, serve
from tests.unit import test_manifests


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def health(clock: Clock) -> Health:
    return Health(stall_s=10.0, clock=clock)


class TestLiveness:
    def test_healthy_within_stall_s_of_the_last_beat(self, health: Health, clock: Clock) -> None:
        """A beat keeps /healthz 200 for exactly stall_s."""
        health.beat()
        clock.t += 10.0
        assert health.liveness()[0] is True

    def test_stalled_after_stall_s_without_a_beat(self, health: Health, clock: Clock) -> None:
        """No beat for longer than stall_s: unhealthy, with a reason naming the stall."""
        health.beat()
        clock.t += 10.5
        ok, body = health.liveness()
        assert ok is False
        assert body["status"] == "stalled"
        assert "10.5 s" in body["reason"] and "health.stall_s" in body["reason"]

    def test_start_counts_from_construction(self, health: Health, clock: Clock) -> None:
        """Before any beat, the stall clock runs from construction."""
        clock.t += 11
        assert health.liveness()[0] is False

    def test_backpressure_wait_is_not_a_stall(self, health: Health, clock: Clock) -> None:
        """Waiting for the sink under blocked() stays 200 (status blocked), and beats on exit."""
        with health.blocked("the sink"):
            clock.t += 100
            ok, body = health.liveness()
            assert ok is True and body["status"] == "blocked"
            assert "the sink" in body["reason"]
        clock.t += 5
        assert health.liveness() == (True, {"stall_s": 10.0, "since_progress_s": 5.0,
                                            "status": "ok"})

    def test_stall_s_must_be_positive(self) -> None:
        """A zero stall_s is refused (it would make /healthz always fail)."""
        with pytest.raises(ValueError, match="stall_s"):
            Health(0)


class TestReadiness:
    def test_no_conditions_is_ready(self, health: Health) -> None:
        """With nothing to wait for, /readyz is 200."""
        assert health.readiness()[0] is True

    def test_ready_only_when_every_condition_is_ok(self, health: Health) -> None:
        """One false condition keeps /readyz 503 and names it with its reason."""
        health.set_ready("subscribed", True)
        health.set_ready("initial_dump", False, "initial table dump not done")
        ok, body = health.readiness()
        assert ok is False
        assert body["reason"] == "not ready: initial_dump: initial table dump not done"
        assert body["conditions"]["subscribed"] == {"ok": True, "reason": ""}
        health.set_ready("initial_dump", True, "12 entries")
        ok, body = health.readiness()
        assert ok is True and body["status"] == "ready" and "reason" not in body

    def test_info_is_shown_and_does_not_affect_readiness(self, health: Health) -> None:
        """set_info adds facts to the body; readiness ignores them."""
        health.set_info("node_role", {"gateway": True})
        ok, body = health.readiness()
        assert ok is True and body["info"] == {"node_role": {"gateway": True}}


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def served(clock: Clock) -> Iterator[tuple[str, Health, Metrics]]:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    health = Health(stall_s=10.0, clock=clock)
    server = serve(registry, "127.0.0.1:0", health)
    try:
        yield f"http://127.0.0.1:{server.server_port}", health, metrics
    finally:
        server.shutdown()
        server.server_close()


class TestServe:
    def test_metrics_and_probes_share_one_address(
            self, served: tuple[str, Health, Metrics]) -> None:
        """/metrics serves Prometheus text, /healthz and /readyz JSON, on the same port."""
        url, _health, metrics = served
        metrics.inc("shipper_overruns_total")
        code, body = _get(url + "/metrics")
        assert code == 200 and b"shipper_overruns_total 1.0" in body
        code, body = _get(url + "/healthz")
        assert code == 200 and json.loads(body)["status"] == "ok"
        code, body = _get(url + "/readyz")
        assert code == 200 and json.loads(body)["status"] == "ready"

    def test_probes_answer_503_with_a_json_reason(
            self, served: tuple[str, Health, Metrics], clock: Clock) -> None:
        """A stalled loop and an unmet condition turn the probes 503 with a reason."""
        url, health, _ = served
        health.set_ready("pod_sync", False, "first pod sync not finished")
        clock.t += 60
        code, body = _get(url + "/healthz")
        assert code == 503
        assert json.loads(body)["reason"].startswith("event loop completed no iteration")
        code, body = _get(url + "/readyz")
        doc: dict[str, Any] = json.loads(body)
        assert code == 503 and doc["conditions"]["pod_sync"]["ok"] is False
        assert "pod_sync" in doc["reason"]

    def test_a_probe_is_answered_while_a_scrape_is_slow(
            self, served: tuple[str, Health, Metrics]) -> None:
        """Requests are served by separate threads: a hung scrape does not delay /healthz."""
        url, _health, metrics = served
        release = threading.Event()
        entered = threading.Event()
        orig = metrics.collect

        def slow() -> Iterator[object]:
            entered.set()
            release.wait(10)
            yield from orig()

        metrics.collect = slow  # type: ignore[method-assign]
        t = threading.Thread(target=_get, args=(url + "/metrics",), daemon=True)
        t.start()
        try:
            assert entered.wait(5)
            assert _get(url + "/healthz")[0] == 200
        finally:
            release.set()
            t.join(10)


@pytest.mark.parametrize("kdir", test_manifests.kustomizations(), ids=test_manifests.kid)
def test_manifests_probe_healthz_and_readyz_on_the_metrics_port(kdir: Path,
                                                                tmp_path: Path) -> None:
    """In every rendering the shipper's liveness probe is /healthz and its readiness probe
    /readyz, on the container port that the rendered config's metrics.address serves."""
    from shipper import config

    objects = test_manifests.render(kdir)
    configmaps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    specs = test_manifests.pod_specs(objects)
    assert specs, f"{kdir} renders no workload"
    for where, spec in specs:
        c = next(c for c in spec["containers"] if c["name"] == "shipper")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        args = c["args"]
        cfg_path = Path(args[args.index("--config") + 1])
        mount = next(m for m in c["volumeMounts"] if Path(m["mountPath"]) == cfg_path.parent)
        data = configmaps[volumes[mount["name"]]["configMap"]["name"]]["data"]
        (tmp_path / "c.yaml").write_text(data[cfg_path.name])
        address = config.load(tmp_path / "c.yaml").metrics.address
        assert address, f"{where}: metrics.address is off, so the probes have no server"
        metrics_port = int(address.rpartition(":")[2])
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = c[probe]["httpGet"]
            assert get["path"] == path, (where, probe)
            port = get["port"]
            assert (ports[port] if isinstance(port, str) else port) == metrics_port, \
                (where, probe)
