"""``flowlog-shipper lookup`` on records the real shipper wrote from real kernel events.

The lab's pods share one source port through MASQUERADE; the external server
logs the node address and port it saw (the remote log line) and the payload
names the pod that sent it (the ground truth). The shipper's file sink
rotates; the rotated files are gzip-compressed as logrotate would. Every
server-side peer must be answered with its own pod, singly and as a batch.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from shipper.ecs import rfc3339
from shipper.lab import Lab
from tests.integration.harness import ShipperProcess, get

pytestmark = pytest.mark.kernel  # root only; in CI a skip fails (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def shipper_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "shipper"
    d.mkdir()
    yield d


def _lookup(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shipper", "lookup", *args],
                          capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)


@pytest.mark.parametrize("family", [4, 6])
def test_lookup_names_the_pod_the_server_saw(lab: Lab, shipper_dir: Path, tmp_path: Path,
                                             family: int) -> None:
    """Each (node address, port) the server logged is answered with the pod that sent it,
    from rotated and gzip-compressed file-sink output, one query at a time and in a batch."""
    sp = ShipperProcess(lab, shipper_dir, config={"sink.file.max_bytes": 1024,
                                                  "sink.file.keep": 50})
    try:
        sp.wait_ready()
        # an earlier flow elsewhere, in a batch (and so a file) of its own
        lab.start_server("tcp", 8081, family)
        lab.connect(0, "tcp", family, 8081)
        sp.wait_records(lambda r: get(r, "destination.port") == 8081, n=1)
        names = [lab.identities[p].name for p in (0, 1, 2)]
        server = lab.start_server("tcp", 8080, family)
        lab.connect_many([0, 1, 2], sport=40000, family=family, hold_s=1.0,
                         payloads=[n.encode() for n in names])
        assert len(server.wait_seen(3, 10)) == 3
        deadline = time.monotonic() + 10
        while len(server.payloads()) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        at = rfc3339(time.time_ns())  # when the remote service logged the lines
        truth = {peer: data.decode() for peer, data in server.payloads().items()}
        assert sorted(truth.values()) == sorted(names)
        sp.wait_records(lambda r: get(r, "event.action") == "new"
                        and get(r, "destination.port") == 8080, n=3)
    finally:
        sp.stop()
    records = tmp_path / "records"
    records.mkdir()
    rotated = sorted(shipper_dir.glob("flows.json.*"))
    assert rotated, "the file sink did not rotate"
    for p in rotated:  # logrotate's compress
        (records / (p.name + ".gz")).write_bytes(gzip.compress(p.read_bytes()))
    (records / "flows.json").write_bytes((shipper_dir / "flows.json").read_bytes())
    ext = lab.ext_ip(family)
    queries = []
    for (ip, port), name in truth.items():
        nat = f"[{ip}]:{port}" if family == 6 else f"{ip}:{port}"
        queries.append((nat, name))
        r = _lookup("--nat", nat, "--at", at, "--dst", ext, "--proto", "tcp", "--window", "1m",
                    "--json", str(records))
        assert r.returncode == 0, r.stdout + r.stderr
        (flow,) = orjson.loads(r.stdout)["flows"]
        assert flow["kubernetes"]["pod"]["name"] == name
        assert flow["source"]["port"] == 40000 and flow["attribution"] == "resolved"
    qfile = tmp_path / "remote.csv"
    dst = f"[{ext}]:8080" if family == 6 else f"{ext}:8080"
    qfile.write_text("".join(f"{at},{nat},{dst},tcp\n" for nat, _ in queries))
    r = _lookup("--queries", str(qfile), "--window", "1m", "--json", str(records))
    assert r.returncode == 0, r.stdout + r.stderr
    answers = [orjson.loads(x) for x in r.stdout.splitlines()]
    assert [a["flows"][0]["kubernetes"]["pod"]["name"] for a in answers] == [
        name for _, name in queries]
