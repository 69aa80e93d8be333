"""Tests for shipper.cidrs: the one CIDR type, checked against netaddr as the reference."""

from __future__ import annotations

import ipaddress
import json
import pickle
import random

import netaddr
import pytest

from shipper.cidrs import (
    Cidr,
    CidrError,
    host_cidr,
    in_ranges,
    merge,
    ranges,
    split_cidrs,
    subtract,
    to_cidrs,
)

ADDRESSES = ["10.0.0.0", "10.1.2.3", "0.0.0.0", "255.255.255.255", "1.2.3", "010.0.0.1",
             "1.2.3.256", "0x0a.0.0.1", "::", "::1", "fd00::", "fd00:10:16::5",
             "::ffff:1.2.3.4", "::1.2.3.4", "fe80::1%eth0", "1::2::3", "g::1",
             "2001:db8::1.2.3.4", "garbage", ""]
PREFIXES = ["", "/", "/0", "/8", "/08", "/+8", "/ 8", "/8 ", "/0_8", "/33", "/32", "/64",
            "/128", "/129", "/-1", "/255.0.0.0", "/0.255.255.255", "/255.0.255.0", "/0.0.0.0",
            "/255.255.255.255", "/ffff:ffff::", "/::ffff", "/ffff::ffff", "/x", "/8/1"]


def reference(text: str) -> str | None:
    """What netaddr (the library used before) makes of ``text``; None if it rejects it."""
    try:
        return str(netaddr.IPNetwork(text.strip()).cidr)
    except (netaddr.AddrFormatError, ValueError, TypeError):
        return None


def ours(text: str) -> str | None:
    try:
        return str(Cidr(text))
    except ValueError:
        return None


def random_cidrs(rnd: random.Random, n4: int, n6: int) -> list[str]:
    return ([f"{ipaddress.IPv4Address(rnd.getrandbits(32))}/{rnd.randint(0, 32)}"
             for _ in range(n4)]
            + [f"{ipaddress.IPv6Address(rnd.getrandbits(128))}/{rnd.randint(0, 128)}"
               for _ in range(n6)])


class TestParseLikeNetaddr:
    @pytest.mark.parametrize("addr", ADDRESSES)
    def test_same_verdict_and_network_as_netaddr(self, addr: str) -> None:
        """Every address x prefix form (masks, odd prefixes, zones, padding) is accepted
        exactly when netaddr's IPNetwork(...).cidr accepts it, as the same network text."""
        for prefix in PREFIXES:
            for pad in ("", " ", "\t"):
                text = f"{pad}{addr}{prefix}{pad}"
                assert ours(text) == reference(text), repr(text)

    def test_random_cidrs_match_netaddr(self) -> None:
        """Random v4/v6 CIDRs with host bits set normalise to netaddr's network text."""
        for text in random_cidrs(random.Random(7), 300, 300):
            assert ours(text) == reference(text), text


class TestCidr:
    def test_is_its_normal_text(self) -> None:
        """A Cidr equals, hashes and serialises as its normal text and carries the network."""
        c = Cidr(" 10.16.0.9/16 ")
        assert c == "10.16.0.0/16" and hash(c) == hash("10.16.0.0/16")
        assert c.network == ipaddress.ip_network("10.16.0.0/16")
        assert (c.version, c.first, c.last) == (4, 0x0A100000, 0x0A10FFFF)
        assert json.dumps([c]) == '["10.16.0.0/16"]'

    def test_ipv4_mapped_text_stays_dotted(self) -> None:
        """IPv6 text is written as inet_ntop writes it (records do the same)."""
        assert Cidr("::ffff:1.2.3.4/128") == "::ffff:1.2.3.4/128"

    def test_cidr_passes_through(self) -> None:
        """Parsing a Cidr again returns the same object (no second parse)."""
        c = Cidr("fd00::/64")
        assert Cidr(c) is c and to_cidrs([c])[0] is c

    def test_pickles(self) -> None:
        """A Cidr survives pickling with its network."""
        c = pickle.loads(pickle.dumps(Cidr("10.0.0.0/8")))
        assert c == "10.0.0.0/8" and c.network.prefixlen == 8


class TestToCidrs:
    def test_every_bad_value_named_with_a_reason(self) -> None:
        """CidrError names each bad value, in order, with why it is not a CIDR."""
        with pytest.raises(CidrError) as ei:
            to_cidrs(["10.0.0.0/8", "garbage", "10.0.0.0/33", "1.2.3.4/255.0.255.0", "", None])
        assert ei.value.values == ["garbage", "10.0.0.0/33", "1.2.3.4/255.0.255.0", "", None]
        p = ei.value.problems
        assert p[0] == "'garbage' is not a CIDR ('garbage' is not an IPv4 or IPv6 address)"
        assert p[1] == "'10.0.0.0/33' is not a CIDR (prefix length 33 is not in 0..32)"
        assert "'255.0.255.0' is not a prefix length, netmask or hostmask" in p[2]
        assert p[3] == "'' is not a CIDR (empty)"
        assert p[4] == "None is not a CIDR (not text but NoneType)"
        assert str(ei.value) == "; ".join(p)

    def test_split_api_text(self) -> None:
        """Comma-separated API text: blanks ignored, None is none, garbage named."""
        assert split_cidrs(" 10.16.0.0/16, fd00:10:16::/64,,") == ("10.16.0.0/16",
                                                                  "fd00:10:16::/64")
        assert split_cidrs(None) == () and split_cidrs("") == ()
        with pytest.raises(CidrError) as ei:
            split_cidrs("10.0.0.0/8,nope")
        assert ei.value.values == ["nope"]
        with pytest.raises(CidrError):
            split_cidrs(42)

    def test_host_cidr(self) -> None:
        """An address becomes its host CIDR; a CIDR or garbage is refused."""
        assert host_cidr("172.18.0.2") == "172.18.0.2/32"
        assert host_cidr(" fc00::2 ") == "fc00::2/128"
        for bad in ("10.0.0.0/8", "nope", None):
            with pytest.raises(ValueError):
                host_cidr(bad)


class TestSets:
    def test_merge_matches_netaddr(self) -> None:
        """merge equals netaddr.cidr_merge (IPv4 first, then IPv6, ascending)."""
        rnd = random.Random(11)
        for _ in range(200):
            nets = random_cidrs(rnd, rnd.randint(0, 10), rnd.randint(0, 5))
            want = [str(n) for n in netaddr.cidr_merge([netaddr.IPNetwork(x).cidr
                                                        for x in nets])]
            assert list(merge(nets)) == want, nets

    def test_subtract_matches_netaddr(self) -> None:
        """subtract equals netaddr IPSet difference, as CIDRs."""
        rnd = random.Random(12)
        for _ in range(200):
            nets = random_cidrs(rnd, rnd.randint(0, 8), rnd.randint(0, 3))
            gone = random_cidrs(rnd, rnd.randint(0, 4), rnd.randint(0, 2))
            want = netaddr.IPSet([netaddr.IPNetwork(x).cidr for x in nets]) - netaddr.IPSet(
                [netaddr.IPNetwork(x).cidr for x in gone])
            assert list(subtract(nets, gone)) == [str(n) for n in want.iter_cidrs()]

    def test_ranges_membership_matches_netaddr(self) -> None:
        """in_ranges agrees with netaddr IPSet membership, at and around every boundary."""
        rnd = random.Random(13)
        for _ in range(50):
            nets = random_cidrs(rnd, rnd.randint(0, 12), rnd.randint(0, 6))
            v4, v6 = ranges(nets)
            ref = netaddr.IPSet([netaddr.IPNetwork(x).cidr for x in nets])
            for c in to_cidrs(nets):
                r, width = (v4, 32) if c.version == 4 else (v6, 128)
                for ip in (c.first - 1, c.first, c.last, c.last + 1):
                    if 0 <= ip < 1 << width:
                        want = netaddr.IPAddress(ip, c.version) in ref
                        assert in_ranges(r, ip) is want, (nets, c, ip)
