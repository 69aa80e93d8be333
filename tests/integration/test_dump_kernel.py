"""Table dumps (``conntrack.dump_table``) on the real kernel: the helper-process reader,
the kernel-side dump filter (family, CTA_STATUS + CTA_STATUS_MASK for IPS_SRC_NAT), the
undecoded reads (``conntrack.dump_chunks``) and the one-shot dump over worker processes
(``flowlog-shipper dump --workers N``).

The oracle is ``conntrack -L -o id`` (conntrack-tools) on the same table.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from shipper.lab import Lab
from shipper.record import FlowEvent
from shipper.sources import conntrack
from shipper.sources.decode import NLMSG_DONE, LayoutDecoder, iter_messages

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

NATED = 3000  # pod -> ext UDP flows: MASQUERADEd, about 150 dump datagrams
IPS_SRC_NAT = 0x10


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(pods=1, ipv6=True) as built:
        built.set_sysctl(built.gw, "net.netfilter.nf_conntrack_udp_timeout", 300)
        res = built.udp_flood(0, 5000, NATED / 5000 + 1, max_count=NATED)
        assert res.sent == NATED
        # Entries the gateway did not NAT, v4 and v6 (inserted, as conntrackd would).
        for src, dst in (("10.9.0.5", "10.8.0.1"), ("fd00:9::5", "fd00:8::1")):
            built.run(built.gw, "conntrack", "-I", "-p", "udp", "-s", src, "-d", dst,
                      "--sport", "1000", "--dport", "2000", "-t", "300")
        yield built


def _ids(lab: Lab, *args: str) -> set[int]:
    out = lab.run(lab.gw, "conntrack", "-L", "-o", "id", *args).stdout
    return {int(line.rsplit("id=", 1)[1].split()[0]) for line in out.splitlines()
            if "id=" in line}


class TestDump:
    def test_full_dump_matches_conntrack_list(self, lab: Lab) -> None:
        """Every entry `conntrack -L` lists (thousands, many datagrams through the reader
        process) comes out once as a snapshot event, v4 and v6."""
        before = _ids(lab)
        events = list(conntrack.dump_table(lab.gw, LayoutDecoder()))
        after = _ids(lab)
        got = [ev.ct_id for ev in events]
        assert len(got) == len(set(got))  # once each
        assert before & after <= set(got) <= before | after
        assert len(before) >= NATED + 2
        assert {ev.action for ev in events} == {"snapshot"}
        assert {ev.family for ev in events} == {4, 6}

    def test_snat_only_keeps_exactly_the_source_nated_entries(self, lab: Lab) -> None:
        """With snat_only the kernel returns the entries with IPS_SRC_NAT (the pod flows)
        and none of the others."""
        events = list(conntrack.dump_table(lab.gw, LayoutDecoder(), snat_only=True))
        assert events
        assert all((ev.status or 0) & IPS_SRC_NAT for ev in events)
        got = {ev.ct_id for ev in events}
        nated = _ids(lab, "--src-nat")
        assert len(nated) >= NATED
        assert nated <= got
        not_nated = _ids(lab) - nated
        assert not_nated and not (got & not_nated)

    def test_family_filter(self, lab: Lab) -> None:
        """family=AF_INET6 returns only the IPv6 entries, AF_INET only the IPv4 ones."""
        v6 = list(conntrack.dump_table(lab.gw, LayoutDecoder(), family=socket.AF_INET6))
        v4 = list(conntrack.dump_table(lab.gw, LayoutDecoder(), family=socket.AF_INET))
        assert v6 and {ev.family for ev in v6} == {6}
        assert v4 and {ev.family for ev in v4} == {4}
        assert {ev.ct_id for ev in v6} == _ids(lab, "-f", "ipv6")

    def test_dump_in_a_missing_namespace_is_a_source_error(self) -> None:
        """A namespace that does not exist is a SourceError naming it, not a hang."""
        with pytest.raises(conntrack.SourceError, match="i8-no-such-ns"):
            list(conntrack.dump_table("i8-no-such-ns", LayoutDecoder()))

    def test_chunks_hold_every_entry_once_in_whole_messages(self, lab: Lab) -> None:
        """dump_chunks: each read's run of whole messages (every message inside its
        chunk), the last one ending with NLMSG_DONE; decoded, the chunks hold the same
        entries as dump_table, each once."""
        chunks = [bytes(c) for c in conntrack.dump_chunks(lab.gw)]
        assert len(chunks) > 10
        types = []
        for c in chunks:
            msgs = list(iter_messages(c, len(c)))
            assert sum((length + 3) & ~3 for _off, length, _t in msgs) >= len(c) - 3
            types += [t for _off, _length, t in msgs]
        assert types[-1] == NLMSG_DONE and types.count(NLMSG_DONE) == 1
        decoder, events = LayoutDecoder(), list[FlowEvent]()
        for c in chunks:
            decoder.decode_dump(c, len(c), 0, events)
        got = [ev.ct_id for ev in events]
        assert len(got) == len(set(got))
        table = {ev.ct_id for ev in conntrack.dump_table(lab.gw, LayoutDecoder())}
        assert len(table ^ set(got)) <= 4  # the gateway's own few entries may come and go
        assert len(got) >= NATED


def _shipper_dump(lab: Lab, tmp: Path, workers: int) -> tuple[list[dict[str, Any]], str]:
    """`flowlog-shipper dump --workers N` in the gateway: its records and stderr."""
    out = tmp / f"dump-{workers}.json"
    pods = lab.write_pod_list(tmp / "pods.json")
    cmd = [sys.executable, "-m", "shipper", "dump", "--workers", str(workers),
           "--netns", lab.gw, "--output", str(out), "--pods-file", str(pods),
           "--metrics-address", "none", "--node-name", "dump-test"]
    for cidr in lab.pod_cidrs():
        cmd += ["--pod-cidr", cidr]
    for cidr in lab.cluster_cidrs():
        cmd += ["--exclude-cidr", cidr]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False,
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2])))
    assert res.returncode == 0, res.stderr[-3000:]
    return [orjson.loads(line) for line in out.read_bytes().splitlines()], res.stderr


def test_dump_over_workers_ships_each_entry_once(lab: Lab, tmp_path: Path) -> None:
    """`dump --workers 2`: this process reads the table, two workers encode it; every pod
    flow of the table is shipped exactly once, attributed to the pod, the same entries
    as the one-process dump, both workers had a part; the worker processes are gone."""
    one, _ = _shipper_dump(lab, tmp_path, 1)
    two, err = _shipper_dump(lab, tmp_path, 2)
    ids_one = [r["conntrack"]["id"] for r in one]
    ids_two = [r["conntrack"]["id"] for r in two]
    assert len(ids_two) == len(set(ids_two)) >= NATED  # each once
    assert ids_two and set(ids_two) == set(ids_one)
    assert {r["event"]["action"] for r in two} == {"snapshot"}
    pod = lab.pod_list()["items"][0]["metadata"]["name"]
    assert {r["kubernetes"]["pod"]["name"] for r in two} == {pod}
    logs = [orjson.loads(line) for line in err.splitlines() if line.startswith("{")]
    parts = {line["worker"]: line["entries"] for line in logs
             if line.get("msg") == "table dumped" and "worker" in line
             and "workers" not in line}
    assert set(parts) == {0, 1} and all(parts.values())
    assert sum(parts.values()) == len(ids_two)
