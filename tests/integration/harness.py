"""Runs the real shipper (``python -m shipper``) against a netns lab, for kernel tests.

:class:`ShipperProcess` starts the CLI as a subprocess reading conntrack in the
lab's gateway namespace with the file sink, and offers bounded polls over the
records it wrote and the metrics it serves. It always stops the process (by
its PID) when the test ends, also when the test fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from shipper.lab import Lab
from shipper.sources import conntrack

Record = dict[str, Any]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(record: Record, dotted: str) -> Any:
    """``get(r, "source.nat.port")`` -> the nested value, or None."""
    node: Any = record
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


class ShipperProcess:
    """The shipper CLI running against a lab's gateway namespace."""

    def __init__(
        self,
        lab: Lab,
        tmp: Path,
        *,
        config: dict[str, Any] | None = None,
        extra_args: list[str] | None = None,
        pods_file: bool = True,
        command: str = "run",
        receiver: Any = None,
    ) -> None:
        """``receiver``: a started ``tests.fakes.forward_receiver.ForwardReceiver``; the
        shipper then uses the forward sink to it and records are read from it."""
        self.lab = lab
        self.tmp = tmp
        self.output = tmp / "flows.json"
        self.pods_file = tmp / "pods.json"
        self.metrics_port = free_port()
        self.stderr_path = tmp / "shipper.stderr"
        cfg: dict[str, Any] = {
            "node_name": "lab-node",
            "conntrack": {"netns": lab.gw},
            "filter": {"pod_cidrs": lab.pod_cidrs(), "cluster_cidrs": lab.cluster_cidrs()},
            "batch": {"max_age_s": 0.2},
            "sink": {"type": "file", "file": {"path": str(self.output)}},
            "metrics": {"address": f"127.0.0.1:{self.metrics_port}"},
            "inventory": {"reload_interval_s": 0.2},
            # Each process its own history unless a test shares one (never the host's).
            "state_dir": str(tmp / "state"),
        }
        self.receiver = receiver
        if receiver is not None:
            cfg["sink"] = {"type": "forward", "forward": {"addresses": [receiver.address],
                                                          "tag": "flowlog.test"}}
        if pods_file:
            lab.write_pod_list(self.pods_file)
            cfg["inventory"]["pods_file"] = str(self.pods_file)
        for key, value in (config or {}).items():
            node = cfg
            parts = key.split(".")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = value
        self.config_path = tmp / "shipper.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.argv = [sys.executable, "-m", "shipper", command, "--config",
                     str(self.config_path), *(extra_args or [])]
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=self._stderr,
                                     stdin=subprocess.DEVNULL)
        self.returncode: int | None = None

    # ---- observation ---------------------------------------------------------

    def records(self) -> list[Record]:
        """Every complete record written (file sink) or received (forward sink) so far."""
        if self.receiver is not None:
            return [r.record for r in self.receiver.records()]
        # The file sink may rotate (flows.json.N is the oldest, .1 the newest, then
        # flows.json): read them all, oldest first. A rotation between two reads can
        # show a file twice, so identical lines (same event.id) count once; one it
        # hides is seen on the next poll.
        rotated = sorted((p for p in self.output.parent.glob(self.output.name + ".*")
                          if p.suffix[1:].isdigit()), key=lambda p: -int(p.suffix[1:]))
        lines: dict[bytes, None] = {}
        for path in [*rotated, self.output]:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            lines.update(dict.fromkeys(line for line in data.split(b"\n")[:-1] if line))
        return [json.loads(line) for line in lines]

    def wait_records(
        self, pred: Callable[[Record], bool], n: int = 1, timeout: float = 15.0
    ) -> list[Record]:
        """Poll until ``n`` records match ``pred`` (bounded); return the matches."""
        deadline = time.monotonic() + timeout
        while True:
            hits = [r for r in self.records() if pred(r)]
            if len(hits) >= n:
                return hits
            if self.proc.poll() is not None:
                raise AssertionError(f"shipper exited ({self.proc.returncode}): {self.stderr()}")
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"only {len(hits)}/{n} matching records after {timeout}s; "
                    f"all records: {self.records()}\nstderr: {self.stderr()[-3000:]}"
                )
            time.sleep(0.05)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Scrape one sample from /metrics (0 if absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        total = 0.0
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                    total += s.value
        return total

    def wait_metric(self, name: str, at_least: float, labels: dict[str, str] | None = None,
                    timeout: float = 15.0) -> float:
        """Poll /metrics until the sample reaches ``at_least`` (bounded)."""
        deadline = time.monotonic() + timeout
        last = 0.0
        while time.monotonic() < deadline:
            try:
                last = self.metric(name, labels)
            except OSError:
                last = 0.0
            if last >= at_least:
                return last
            if self.proc.poll() is not None:
                raise AssertionError(f"shipper exited: {self.stderr()}")
            time.sleep(0.1)
        raise AssertionError(f"{name}{labels or ''} = {last} < {at_least} after {timeout}s")

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until the shipper logged that it listens and the initial dump is done."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.stderr()
            if "initial table dump" in text or "table dumped" in text:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"shipper exited ({self.proc.returncode}): {text}")
            time.sleep(0.05)
        raise AssertionError(f"shipper not ready after {timeout}s: {self.stderr()}")

    def stderr(self) -> str:
        """What the shipper logged so far."""
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def logs(self) -> list[dict[str, Any]]:
        """The shipper's JSON log lines, parsed."""
        out = []
        for line in self.stderr().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    # ---- control -------------------------------------------------------------

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal the shipper (by PID) and wait; SIGKILL after ``timeout``."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.returncode = self.proc.returncode
        if not self._stderr.closed:
            self._stderr.close()
        return self.returncode


def ct_delete(lab: Lab, *args: str) -> None:
    """Delete conntrack entries in the gateway (produces DESTROY events now)."""
    lab.run(lab.gw, "conntrack", "-D", *args, check=False)


def event_socket(lab: Lab) -> socket.socket:
    """A plain NEW+DESTROY event socket in the gateway, 8 MiB asked (no reliable DESTROY:
    one socket)."""
    sock = conntrack.open_event_socket(lab.gw, ["new", "destroy"], 8 << 20)
    assert isinstance(sock, socket.socket)
    return sock
