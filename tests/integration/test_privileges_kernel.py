"""The container's privileges are enough, and only just (real kernel, lab namespaces).

The DaemonSet runs the shipper as root with every capability dropped except
CAP_NET_ADMIN, in the node's network namespace (hostNetwork); the Dockerfile says why.
These tests run the real CLI the same way and check those statements: inside the lab's
gateway namespace (``ip netns exec``, standing in for hostNetwork), with the capability
bounding set cut down by util-linux ``setpriv`` (for root, exec grants exactly the
bounding set). Each shipper is stopped by its PID, also when a test fails; the lab
removes its namespaces.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from shipper.lab import Lab
from tests.integration.harness import Record, get

pytestmark = [pytest.mark.kernel, pytest.mark.lab(pods=1, ipv6=False)]  # tests/conftest.py

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21


class CappedShipper:
    """``python -m shipper run`` with only the given capabilities, file sink."""

    def __init__(self, lab: Lab, tmp: Path, caps: list[str], *, inside_gw: bool,
                 netns: str | None) -> None:
        tmp.mkdir()
        self.output = tmp / "flows.json"
        self.stderr_path = tmp / "shipper.stderr"
        pods_file = lab.write_pod_list(tmp / "pods.json")
        cfg: dict[str, Any] = {
            "node_name": "lab-node",
            "conntrack": {"netns": netns},
            "filter": {"pod_cidrs": lab.pod_cidrs(), "cluster_cidrs": lab.cluster_cidrs()},
            "batch": {"max_age_s": 0.2},
            "sink": {"type": "file", "file": {"path": str(self.output)}},
            "metrics": {"address": None},
            "inventory": {"pods_file": str(pods_file)},
        }
        config = tmp / "shipper.yaml"
        config.write_text(yaml.safe_dump(cfg))
        bounding = "-all" + "".join(f",+{c}" for c in caps)
        argv = ["setpriv", "--bounding-set", bounding,
                sys.executable, "-m", "shipper", "run", "--config", str(config)]
        if inside_gw:
            argv = ["ip", "netns", "exec", lab.gw, *argv]  # execs in place: same PID
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self._stderr)

    def stderr(self) -> str:
        """What the shipper logged so far."""
        return self.stderr_path.read_text(errors="replace")

    def effective_caps(self, timeout: float = 10.0) -> int:
        """CapEff of the shipper process, once it runs Python (bounded poll)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = Path(f"/proc/{self.proc.pid}")
            try:  # cmdline read around status: the same program both times (no exec between)
                before = (proc / "cmdline").read_bytes()
                status = (proc / "status").read_text()
                after = (proc / "cmdline").read_bytes()
            except FileNotFoundError:
                break
            if before == after and before.startswith(sys.executable.encode() + b"\0"):
                line = next(x for x in status.splitlines() if x.startswith("CapEff:"))
                return int(line.split()[1], 16)
            time.sleep(0.02)
        raise AssertionError(f"shipper process not seen running: {self.stderr()}")

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until the initial table dump is done (bounded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "initial table dump" in self.stderr() or "table dumped" in self.stderr():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"shipper exited ({self.proc.returncode}): {self.stderr()}")
            time.sleep(0.05)
        raise AssertionError(f"shipper not ready after {timeout}s: {self.stderr()}")

    def wait_exit(self, timeout: float = 20.0) -> int:
        """Wait (bounded) for the shipper to exit by itself; its exit code."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"shipper still running after {timeout}s: "
                                 f"{self.stderr()}") from exc

    def records(self) -> list[Record]:
        """Every complete record written so far."""
        try:
            data = self.output.read_bytes()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in data.split(b"\n")[:-1] if line]

    def wait_record(self, pred: Any, timeout: float = 15.0) -> Record:
        """Poll until a record matches ``pred`` (bounded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hits = [r for r in self.records() if pred(r)]
            if hits:
                return hits[0]
            if self.proc.poll() is not None:
                raise AssertionError(f"shipper exited ({self.proc.returncode}): {self.stderr()}")
            time.sleep(0.05)
        raise AssertionError(f"no matching record after {timeout}s: {self.records()}\n"
                             f"{self.stderr()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM by PID, SIGKILL after a bounded wait; close the log."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._stderr.close()


@pytest.fixture
def capped(lab: Lab, tmp_path: Path) -> Iterator[Any]:
    started: list[CappedShipper] = []

    def start(caps: list[str], *, inside_gw: bool, netns: str | None = None) -> CappedShipper:
        sp = CappedShipper(lab, tmp_path / f"s{len(started)}", caps, inside_gw=inside_gw,
                           netns=netns)
        started.append(sp)
        return sp

    yield start
    for sp in started:
        sp.stop()


def ships_pod_flow(lab: Lab, sp: CappedShipper) -> Record:
    """Make one NATed TCP flow from pod 0 and return the shipper's `new` record of it."""
    lab.start_server("tcp", 8080)
    sport = lab.connect(0, "tcp", dport=8080)
    return sp.wait_record(lambda r: get(r, "event.action") == "new"
                          and get(r, "source.port") == sport
                          and get(r, "destination.port") == 8080)


class TestNetAdminOnly:
    """As deployed: root, hostNetwork, CAP_NET_ADMIN and nothing else."""

    def test_ships_attributed_records_with_only_net_admin(self, lab: Lab, capped: Any) -> None:
        """With only NET_ADMIN in its own network namespace, the shipper subscribes, dumps
        the table and ships an attributed record of a real NATed flow."""
        sp = capped(["net_admin"], inside_gw=True)
        assert sp.effective_caps() == 1 << CAP_NET_ADMIN
        sp.wait_ready()
        rec = ships_pod_flow(lab, sp)
        assert get(rec, "source.nat.ip") == lab.node_ip(4)
        assert get(rec, "kubernetes.pod.name") == lab.identities[0].name

    def test_without_net_admin_subscription_is_refused(self, capped: Any) -> None:
        """Without any capability the kernel refuses the event subscription: exit 3 with
        a message that names CAP_NET_ADMIN."""
        sp = capped([], inside_gw=True)
        assert sp.wait_exit() == 3
        assert "CAP_NET_ADMIN" in sp.stderr()


class TestOtherNamespaceNeedsSysAdmin:
    """Reading another namespace (--netns / conntrack.netns) is the one case for SYS_ADMIN."""

    def test_netns_refused_with_only_net_admin(self, lab: Lab, capped: Any) -> None:
        """setns(2) into the gateway namespace fails with EPERM under NET_ADMIN alone: the
        shipper exits 3 naming the namespace and the error."""
        sp = capped(["net_admin"], inside_gw=False, netns=lab.gw)
        assert sp.wait_exit() == 3
        err = sp.stderr()
        assert "setns failed" in err and "Operation not permitted" in err, err

    def test_netns_works_with_net_admin_and_sys_admin(self, lab: Lab, capped: Any) -> None:
        """With NET_ADMIN + SYS_ADMIN the same --netns setup ships the flow's record."""
        sp = capped(["net_admin", "sys_admin"], inside_gw=False, netns=lab.gw)
        assert sp.effective_caps() == (1 << CAP_NET_ADMIN) | (1 << CAP_SYS_ADMIN)
        sp.wait_ready()
        rec = ships_pod_flow(lab, sp)
        assert get(rec, "kubernetes.pod.name") == lab.identities[0].name
