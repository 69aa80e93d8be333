"""The one CIDR type: parse, normalise, merge and turn into ranges (stdlib ``ipaddress``).

Every CIDR the shipper reads goes through :func:`to_cidrs` (lists: the config
file, the command line, static CIDRs) or :func:`split_cidrs` (comma-separated
text from the Kubernetes API: a Subnet's ``cidrBlock``, a NAT rule's
``srcIPs`` / ``dstIPs``) or :func:`host_cidr` (a Node's InternalIP). Each
value becomes a :class:`Cidr`: the CIDR's normal text form (host bits
cleared, as config, logs, ``/readyz`` and ``check-config`` show it) carrying
its parsed :class:`ipaddress` network. Config validation produces them; the
CIDR filter, subnet discovery and the BPF builder take them as they are
(:func:`to_cidrs` passes a :class:`Cidr` through untouched), so nothing is
parsed twice. :func:`merge` collapses a list per family, :func:`ranges`
builds the sorted, merged integer ranges that the event path searches with
``bisect`` (:func:`in_ranges`).

What is accepted is exactly what netaddr's ``IPNetwork(text).cidr`` (the
library used before) accepts, and a unit test checks it against netaddr: the
address as ``inet_pton`` reads it (dotted quad without leading zeros, or
IPv6, no zone index), then an optional ``/`` and a prefix length as ``int()``
reads it, or a netmask or hostmask of the same family. Leading and trailing
whitespace of the whole value is ignored. IPv6 text is written as
``inet_ntop`` writes it (the form records use for addresses), so
``::ffff:1.2.3.0/120`` stays dotted.

Why the stdlib and not netaddr: the hot path needs neither (it compares
integers), the records and the BPF builder already used ``ipaddress``, it is
typed (mypy checks every use; netaddr has no type information), and it has all
the set operations needed here (``collapse_addresses``, ``address_exclude``,
``subnet_of``). netaddr stays a test dependency, as the reference these
functions are checked against.
"""

from __future__ import annotations

import ipaddress
import socket
from bisect import bisect_right
from collections.abc import Iterable
from typing import Any, NamedTuple

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_WIDTH = {4: 32, 6: 128}


class CidrError(ValueError):
    """Values that are not CIDRs; ``problems`` has one line per bad value, naming it."""

    def __init__(self, problems: list[str], values: list[Any]) -> None:
        """``problems[i]`` describes ``values[i]``."""
        super().__init__("; ".join(problems))
        self.problems = problems
        self.values = values


def _mask_prefix(mask: int, width: int) -> int | None:
    """Prefix length of a netmask (tried first) or hostmask, else None."""
    inverted = ~mask & ((1 << width) - 1)
    if inverted & (inverted + 1) == 0:  # ones then zeros
        return width - inverted.bit_length()
    if mask & (mask + 1) == 0:  # zeros then ones
        return width - mask.bit_length()
    return None


def _address(text: str) -> tuple[int, int]:
    """``(version, integer)`` of an address as ``inet_pton`` reads it; ValueError if none."""
    for version, family in ((4, socket.AF_INET), (6, socket.AF_INET6)):
        try:
            return version, int.from_bytes(socket.inet_pton(family, text), "big")
        except (OSError, ValueError):
            continue
    raise ValueError(f"{text!r} is not an IPv4 or IPv6 address")


def _network(value: Any) -> Network:
    """The network (host bits cleared) that ``value`` names; ValueError saying why not."""
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    if not isinstance(value, str):
        raise ValueError(f"not text but {type(value).__name__}")
    text = value.strip()
    if not text:
        raise ValueError("empty")
    addr, sep, plen = text.partition("/")
    version, ip = _address(addr)
    width = _WIDTH[version]
    if not sep:
        prefix = width
    else:
        try:
            prefix = int(plen)
        except ValueError:
            found = None
            try:  # a netmask or hostmask
                mask_version, mask = _address(plen)
                if mask_version == version:
                    found = _mask_prefix(mask, width)
            except ValueError:
                pass
            if found is None:
                raise ValueError(
                    f"{plen!r} is not a prefix length, netmask or hostmask of IPv{version}"
                ) from None
            prefix = found
        if not 0 <= prefix <= width:
            raise ValueError(f"prefix length {prefix} is not in 0..{width}")
    ip &= ~((1 << (width - prefix)) - 1)
    if version == 4:
        return ipaddress.IPv4Network((ip, prefix))
    return ipaddress.IPv6Network((ip, prefix))


class Cidr(str):
    """A CIDR in normal form: compares, hashes, prints and serialises as its text.

    ``Cidr("10.16.0.9/16") == "10.16.0.0/16"``; the parsed network is
    :attr:`network`. Being a ``str``, it fits everywhere a CIDR used to be
    text (config dumps, logs, metrics, ``/readyz``), while the typed network
    travels with it. Raises ValueError (the reason, without the value) when
    ``value`` is not a CIDR; :func:`to_cidrs` names the value.
    """

    network: Network

    def __new__(cls, value: str | Network) -> Cidr:
        """Parse ``value`` (text or an ``ipaddress`` network); a Cidr is returned as is."""
        if type(value) is cls:
            return value
        net = _network(value)
        if net.version == 4:
            text = net.with_prefixlen
        else:
            addr = socket.inet_ntop(socket.AF_INET6, net.network_address.packed)
            text = f"{addr}/{net.prefixlen}"
        self = super().__new__(cls, text)
        self.network = net
        return self

    @property
    def version(self) -> int:
        """4 or 6."""
        return self.network.version

    @property
    def first(self) -> int:
        """The first address, as an integer."""
        return int(self.network.network_address)

    @property
    def last(self) -> int:
        """The last address, as an integer."""
        return int(self.network.broadcast_address)


def to_cidrs(values: Iterable[Any]) -> tuple[Cidr, ...]:
    """Parse every value (text, network or Cidr), in order; CidrError names every bad one.

    Each problem reads ``'<value>' is not a CIDR (<why>)``.
    """
    out: list[Cidr] = []
    problems: list[str] = []
    bad: list[Any] = []
    for v in values:
        try:
            out.append(Cidr(v))
        except ValueError as exc:
            problems.append(f"{v!r} is not a CIDR ({exc})")
            bad.append(v)
    if problems:
        raise CidrError(problems, bad)
    return tuple(out)


def split_cidrs(text: Any) -> tuple[Cidr, ...]:
    """Comma-separated IPs/CIDRs from the Kubernetes API (blank parts ignored; None: none).

    CidrError names every bad part; a value that is not text is one problem.
    """
    if text is None:
        return ()
    if not isinstance(text, str):
        raise CidrError([f"{text!r} is not a string"], [text])
    return to_cidrs(p for p in text.split(",") if p.strip())


def host_cidr(text: Any) -> Cidr:
    """One IP address as its host CIDR (/32, /128); ValueError if it is not a plain address."""
    if not isinstance(text, str) or "/" in text:
        raise ValueError(f"{text!r} is not an IP address")
    return Cidr(text)


def merge(cidrs: Iterable[str | Network]) -> tuple[Cidr, ...]:
    """The union of ``cidrs`` as the fewest CIDRs: IPv4 first, then IPv6, each ascending."""
    v4: list[ipaddress.IPv4Network] = []
    v6: list[ipaddress.IPv6Network] = []
    for c in cidrs:
        net = Cidr(c).network
        if isinstance(net, ipaddress.IPv4Network):
            v4.append(net)
        else:
            v6.append(net)
    return (*(Cidr(n) for n in ipaddress.collapse_addresses(v4)),
            *(Cidr(n) for n in ipaddress.collapse_addresses(v6)))


def subtract(cidrs: Iterable[str | Network], removed: Iterable[str | Network]) -> tuple[Cidr, ...]:
    """``cidrs`` without the addresses of ``removed``, merged (as :func:`merge` orders them).

    Two CIDRs are either disjoint or one contains the other, so each removal
    either drops a CIDR, splits it (``address_exclude``) or leaves it alone.
    """
    keep = [c.network for c in merge(cidrs)]
    for r in merge(removed):
        gone = r.network
        out: list[Network] = []
        for net in keep:
            if net.version != gone.version or not net.overlaps(gone):
                out.append(net)
            elif not net.subnet_of(gone):  # type: ignore[arg-type]  # same version
                out.extend(net.address_exclude(gone))  # type: ignore[arg-type]
        keep = out
    return merge(keep)


class Ranges(NamedTuple):
    """Sorted, disjoint integer ranges of one family: ``starts[i]..ends[i]`` (inclusive)."""

    starts: tuple[int, ...]
    ends: tuple[int, ...]


def ranges(cidrs: Iterable[str | Network]) -> tuple[Ranges, Ranges]:
    """``(IPv4 ranges, IPv6 ranges)`` of ``cidrs``, merged and sorted for :func:`in_ranges`."""
    merged = merge(cidrs)
    out = []
    for version in (4, 6):
        pairs = [(c.first, c.last) for c in merged if c.version == version]
        out.append(Ranges(tuple(a for a, _ in pairs), tuple(b for _, b in pairs)))
    return out[0], out[1]


def in_ranges(r: Ranges, ip: int) -> bool:
    """True if the integer address ``ip`` lies in one of ``r``'s ranges."""
    i = bisect_right(r.starts, ip) - 1
    return i >= 0 and ip <= r.ends[i]
