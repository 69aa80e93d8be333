"""Tests for shipper.enrich.inventory: the pods file, loaded and reloaded into the index."""

from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from shipper.enrich.inventory import InventoryWatcher, load_file
from shipper.enrich.pod_index import PodIndex
from shipper.enrich.pods import LabelPolicy
from shipper.errors import EnrichError
from shipper.metrics import Metrics

POLICY = LabelPolicy()


def rfc3339(ns: int) -> str:
    """RFC 3339 text of a time in ns (microsecond precision)."""
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat().replace("+00:00", "Z")


def pod_json(name: str, ips: list[str], *, uid: str | None = None, created_ns: int | None = None,
             phase: str = "Running", labels: dict[str, str] | None = None) -> dict[str, Any]:
    """A v1 Pod as ``kubectl get pods -o json`` lists it."""
    created = created_ns if created_ns is not None else time.time_ns() - 3600 * 10**9
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "namespace": "shop",
            "name": name,
            "uid": uid or f"uid-{name}",
            "labels": labels if labels is not None else {"app": name.split("-")[0]},
            "creationTimestamp": rfc3339(created),
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet",
                                 "name": name.split("-")[0], "controller": True}],
        },
        "spec": {"nodeName": "node-1"},
        "status": {
            "phase": phase,
            "podIP": ips[0] if ips else "",
            "podIPs": [{"ip": i} for i in ips],
        },
    }


def pod_list(*items: Any) -> dict[str, Any]:
    """A v1 PodList."""
    return {"apiVersion": "v1", "kind": "List", "items": list(items)}


_mtime = [1_700_000_000 * 10**9]


def write(path: Path, content: bytes | dict[str, Any]) -> None:
    """Atomically replace the file, with a fresh mtime so the change is always detected."""
    data = content if isinstance(content, bytes) else orjson.dumps(content)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    _mtime[0] += 10**9
    os.utime(tmp, ns=(_mtime[0], _mtime[0]))
    os.replace(tmp, path)


def owner(index: PodIndex, addr: str, t_ns: int) -> str | None:
    """Name of the pod that owned ``addr`` at ``t_ns``."""
    a = ipaddress.ip_address(addr)
    meta = index.lookup(a.version, int(a), t_ns)
    return None if meta is None else meta.name


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Bounded poll for ``cond``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


class Env:
    """A watcher over a pods file in tmp_path, with its index, metrics and registry."""

    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "pods.json"
        self.index = PodIndex()
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.watcher = InventoryWatcher(self.path, self.index, POLICY, self.metrics,
                                        interval_s=0.02)

    def reloads(self, result: str) -> float:
        """shipper_inventory_reloads_total{result} as scraped."""
        v = self.registry.get_sample_value("shipper_inventory_reloads_total", {"result": result})
        return v or 0.0


@pytest.fixture
def env(tmp_path: Path) -> Env:
    """A fresh watcher environment."""
    return Env(tmp_path)


class TestLoadFile:
    def test_parses_pod_list(self, tmp_path: Path) -> None:
        """A PodList file yields its pods with their addresses and metadata."""
        p = tmp_path / "pods.json"
        write(p, pod_list(pod_json("web-0", ["10.16.0.5", "fd00:10:16::5"]),
                          pod_json("db-0", ["10.16.0.6"])))
        pods, problems = load_file(p, POLICY)
        assert problems == []
        assert [x.name for x in pods] == ["web-0", "db-0"]
        assert len(pods[0].ips) == 2
        assert pods[0].node == "node-1"
        assert pods[0].owner_kind == "StatefulSet"
        assert pods[0].labels == {"app": "web"}

    def test_missing_file(self, tmp_path: Path) -> None:
        """A missing file raises EnrichError naming the file."""
        with pytest.raises(EnrichError, match="cannot read") as ei:
            load_file(tmp_path / "nope.json", POLICY)
        assert "nope.json" in str(ei.value)

    def test_bad_json(self, tmp_path: Path) -> None:
        """Invalid JSON raises EnrichError naming the file."""
        p = tmp_path / "pods.json"
        p.write_bytes(b'{"items": [')
        with pytest.raises(EnrichError, match="not valid JSON") as ei:
            load_file(p, POLICY)
        assert str(p) in str(ei.value)

    def test_not_a_pod_list(self, tmp_path: Path) -> None:
        """A document without an items list raises EnrichError naming the file."""
        p = tmp_path / "pods.json"
        write(p, {"kind": "Pod"})
        with pytest.raises(EnrichError) as ei:
            load_file(p, POLICY)
        assert str(p) in str(ei.value)

    def test_bad_item_reported(self, tmp_path: Path) -> None:
        """A bad item is returned as a problem naming its index; the others load."""
        p = tmp_path / "pods.json"
        bad = pod_json("bad-0", ["10.16.0.9"])
        del bad["metadata"]["uid"]
        write(p, pod_list(pod_json("web-0", ["10.16.0.5"]), bad))
        pods, problems = load_file(p, POLICY)
        assert [x.name for x in pods] == ["web-0"]
        (problem,) = problems
        assert problem.startswith("items[1]")
        assert "metadata.uid" in problem


class TestReload:
    def test_first_load(self, env: Env) -> None:
        """The first call loads the file, marks the watcher loaded and counts an ok reload."""
        write(env.path, pod_list(pod_json("web-0", ["10.16.0.5"])))
        assert env.watcher.reload_if_changed() is True
        assert env.watcher.loaded.is_set()
        assert owner(env.index, "10.16.0.5", time.time_ns()) == "web-0"
        assert env.reloads("ok") == 1.0

    def test_unchanged_file_not_reloaded(self, env: Env) -> None:
        """An unchanged file is not parsed again and not counted again."""
        write(env.path, pod_list(pod_json("web-0", ["10.16.0.5"])))
        env.watcher.reload_if_changed()
        v = env.index.version
        assert env.watcher.reload_if_changed() is False
        assert env.index.version == v
        assert env.reloads("ok") == 1.0

    def test_reload_on_change(self, env: Env) -> None:
        """A changed file is reloaded: new pods appear, label changes apply."""
        write(env.path, pod_list(pod_json("web-0", ["10.16.0.5"])))
        env.watcher.reload_if_changed()
        write(env.path, pod_list(pod_json("web-0", ["10.16.0.5"], labels={"app": "web2"}),
                                 pod_json("db-0", ["10.16.0.6"])))
        assert env.watcher.reload_if_changed() is True
        now = time.time_ns()
        assert owner(env.index, "10.16.0.6", now) == "db-0"
        meta = env.index.lookup(4, int(ipaddress.ip_address("10.16.0.5")), now)
        assert meta is not None
        assert meta.labels == {"app": "web2"}
        assert env.reloads("ok") == 2.0

    def test_removed_pod_closed_at_reload_time(self, env: Env) -> None:
        """A pod missing from a new file is closed at reload; its address's next owner resolves."""
        write(env.path, pod_list(pod_json("web-0", ["10.16.0.5"], uid="old")))
        env.watcher.reload_if_changed()
        during_old = time.time_ns()
        write(env.path, pod_list())
        before_removal = time.time_ns()
        env.watcher.reload_if_changed()
        after_removal = time.time_ns()
        assert owner(env.index, "10.16.0.5", during_old) == "web-0"
        assert owner(env.index, "10.16.0.5", after_removal + 1) is None
        # A new pod (same name, new uid: a StatefulSet replacement) gets the address later.
        new_created = time.time_ns()
        write(env.path, pod_list(pod_json("web-0", ["10.16.0.5"], uid="new",
                                          created_ns=new_created)))
        env.watcher.reload_if_changed()
        later = time.time_ns()
        assert owner(env.index, "10.16.0.5", during_old) == "web-0"
        (old_iv, new_iv) = env.index.history(4, int(ipaddress.ip_address("10.16.0.5")))
        assert old_iv[2].uid == "old"
        assert old_iv[1] is not None
        assert before_removal <= old_iv[1] <= after_removal
        assert new_iv[2].uid == "new"
        assert new_iv[0] >= old_iv[1]
        m = env.index.lookup(4, int(ipaddress.ip_address("10.16.0.5")), later)
        assert m is not None and m.uid == "new"

    def test_bad_json_keeps_previous_state(self, env: Env) -> None:
        """Unparsable content keeps the last good pods, counts an error once, recovers on fix."""
        write(env.path, pod_list(pod_json("web-0", ["10.16.0.5"])))
        env.watcher.reload_if_changed()
        write(env.path, b'{"items": [ {"metadata": ')
        assert env.watcher.reload_if_changed() is False
        assert env.reloads("error") == 1.0
        assert owner(env.index, "10.16.0.5", time.time_ns()) == "web-0"
        assert env.index.live_pods() == 1
        # The same broken content is not retried in a loop.
        assert env.watcher.reload_if_changed() is False
        assert env.reloads("error") == 1.0
        write(env.path, pod_list(pod_json("db-0", ["10.16.0.6"])))
        assert env.watcher.reload_if_changed() is True
        assert owner(env.index, "10.16.0.6", time.time_ns()) == "db-0"
        assert owner(env.index, "10.16.0.5", time.time_ns()) is None

    def test_not_a_list_keeps_previous_state(self, env: Env) -> None:
        """A valid JSON document that is not a pod list is rejected like bad JSON."""
        write(env.path, pod_list(pod_json("web-0", ["10.16.0.5"])))
        env.watcher.reload_if_changed()
        write(env.path, {"kind": "Pod", "items": "nope"})
        assert env.watcher.reload_if_changed() is False
        assert env.reloads("error") == 1.0
        assert owner(env.index, "10.16.0.5", time.time_ns()) == "web-0"

    def test_bad_item_is_partial(self, env: Env) -> None:
        """A bad item is skipped, the rest applied, and the reload counted as partial."""
        bad = pod_json("bad-0", ["not-an-ip"])
        write(env.path, pod_list(pod_json("web-0", ["10.16.0.5"]), bad, "junk"))
        assert env.watcher.reload_if_changed() is True
        assert env.reloads("partial") == 1.0
        assert env.reloads("ok") == 0.0
        assert owner(env.index, "10.16.0.5", time.time_ns()) == "web-0"
        assert env.index.live_pods() == 1

    def test_missing_file_at_start(self, env: Env) -> None:
        """A missing file: error counted once, watcher marked loaded, file picked up later."""
        assert env.watcher.reload_if_changed() is False
        assert env.watcher.loaded.is_set()
        assert env.reloads("error") == 1.0
        assert env.watcher.reload_if_changed() is False
        assert env.reloads("error") == 1.0
        write(env.path, pod_list(pod_json("web-0", ["10.16.0.5"])))
        assert env.watcher.reload_if_changed() is True
        assert env.reloads("ok") == 1.0

    def test_file_deleted_keeps_pods(self, env: Env) -> None:
        """A file that disappears keeps the last known pods and counts one error."""
        write(env.path, pod_list(pod_json("web-0", ["10.16.0.5"])))
        env.watcher.reload_if_changed()
        env.path.unlink()
        assert env.watcher.reload_if_changed() is False
        assert env.reloads("error") == 1.0
        assert env.watcher.reload_if_changed() is False
        assert env.reloads("error") == 1.0
        assert owner(env.index, "10.16.0.5", time.time_ns()) == "web-0"
        write(env.path, pod_list(pod_json("web-0", ["10.16.0.5"])))
        assert env.watcher.reload_if_changed() is True

    def test_terminal_and_host_network_pods_own_nothing(self, env: Env) -> None:
        """Succeeded pods and hostNetwork pods in the file own no address."""
        done = pod_json("job-0", ["10.16.0.7"], phase="Succeeded")
        host = pod_json("ds-0", ["192.168.1.10"])
        host["spec"]["hostNetwork"] = True
        write(env.path, pod_list(done, host))
        env.watcher.reload_if_changed()
        now = time.time_ns()
        assert owner(env.index, "10.16.0.7", now) is None
        assert owner(env.index, "192.168.1.10", now) is None


class TestThread:
    def test_start_loads_then_follows_changes(self, env: Env) -> None:
        """start() loads synchronously, then the thread picks up changes (bounded poll)."""
        write(env.path, pod_list(pod_json("web-0", ["10.16.0.5"])))
        env.watcher.start()
        try:
            assert env.watcher.loaded.is_set()
            assert owner(env.index, "10.16.0.5", time.time_ns()) == "web-0"
            write(env.path, pod_list(pod_json("db-0", ["10.16.0.6"])))
            assert wait_for(lambda: owner(env.index, "10.16.0.6", time.time_ns()) == "db-0")
        finally:
            env.watcher.stop()
        assert env.watcher._thread is not None
        assert not env.watcher._thread.is_alive()

    def test_thread_survives_unexpected_errors(
        self, env: Env, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An unexpected exception in a reload is counted and the thread keeps running."""
        write(env.path, pod_list(pod_json("web-0", ["10.16.0.5"])))
        env.watcher.start()
        try:
            calls = {"n": 0}
            real = env.index.reconcile

            def flaky(*a: Any, **k: Any) -> None:
                calls["n"] += 1
                if calls["n"] == 1:
                    raise RuntimeError("boom")
                real(*a, **k)

            monkeypatch.setattr(env.index, "reconcile", flaky)
            write(env.path, pod_list(pod_json("db-0", ["10.16.0.6"])))
            assert wait_for(lambda: env.metrics.value(
                "shipper_errors_total", "inventory", "RuntimeError") == 1.0)
            # The failed content was not marked loaded, so the next poll retries it.
            assert wait_for(lambda: owner(env.index, "10.16.0.6", time.time_ns()) == "db-0")
        finally:
            env.watcher.stop()
