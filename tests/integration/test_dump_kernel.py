"""Table dumps (``conntrack.dump_table``) on the real kernel: the helper-process reader and
the kernel-side dump filter (family, CTA_STATUS + CTA_STATUS_MASK for IPS_SRC_NAT).

The oracle is ``conntrack -L -o id`` (conntrack-tools) on the same table.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from shipper.lab import Lab
from shipper.sources import conntrack
from shipper.sources.decode import LayoutDecoder

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
