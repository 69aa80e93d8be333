"""Tests for shipper.sources.bpf: the in-kernel conntrack event pre-filter.

The program is run by :func:`shipper.sources.bpf.run_program` (a classic-BPF
interpreter with the kernel's netlink attribute searches) on the real
ctnetlink messages captured in ``tests/data``; the expected verdict comes
from the independent decoder (:func:`decode_generic`) and netaddr.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import random
import socket
import struct
import sys
from pathlib import Path

import netaddr
import pytest

from shipper.cidrs import to_cidrs
from shipper.errors import SourceError
from shipper.filters.cidr import CidrFilter
from shipper.metrics import Metrics
from shipper.sources import bpf
from shipper.sources.bpf import DROP, KEEP, MAX_INSNS, build_program, run_program, validate
from shipper.sources.decode import decode_generic, walk

DATA = Path(__file__).resolve().parents[1] / "data" / "ctnetlink_messages.json"
MESSAGES: list[bytes] = [bytes.fromhex(m["hex"]) for m in json.loads(DATA.read_text())]
V4 = [m for m in MESSAGES if m[16] == socket.AF_INET]
V6 = [m for m in MESSAGES if m[16] == socket.AF_INET6]
BO = sys.byteorder


def oracle(cidrs: list[str], msg: bytes) -> int:
    """KEEP if the decoder's original source is in ``cidrs`` (netaddr), else DROP."""
    ev = decode_generic(msg, 0, 0)
    return KEEP if netaddr.IPAddress(ev.orig_src, ev.family) in netaddr.IPSet(cidrs) else DROP


def leaf_offset(msg: bytes, name: str) -> int:
    """Payload offset of a decoded leaf (``orig_src``, ``reply_dst``, ...)."""
    _v, leaves, _h = walk(msg, 0, len(msg))
    return next(off for off, n, _c in leaves if n == name)


def with_addr(msg: bytes, name: str, addr: int) -> bytes:
    """``msg`` with the address leaf ``name`` replaced by ``addr``."""
    size = 4 if msg[16] == socket.AF_INET else 16
    off = leaf_offset(msg, name)
    return msg[:off] + addr.to_bytes(size, "big") + msg[off + size:]


def set_len(msg: bytes) -> bytes:
    """``msg`` with nlmsg_len set to its actual length."""
    return struct.pack("=I", len(msg)) + msg[4:]


def cond_jumps(prog: list[tuple[int, int, int, int]]) -> int:
    return sum(1 for c, _jt, _jf, _k in prog if c & 7 == bpf.BPF_JMP and c != bpf.BPF_JMP)


class TestBuildProgram:
    def test_empty_list_keeps_everything(self) -> None:
        """No pod CIDRs: a one-instruction program that keeps every message."""
        prog = build_program([])
        assert prog == [(bpf.BPF_RET | bpf.BPF_K, 0, 0, KEEP)]
        assert all(run_program(prog, m) == KEEP for m in MESSAGES)

    def test_bad_cidrs_are_named(self) -> None:
        """Every bad CIDR is named in one ValueError."""
        with pytest.raises(ValueError, match=r"10\.0\.0\.0/33.*not-an-ip"):
            build_program(["10.0.0.0/8", "10.0.0.0/33", "not-an-ip"])

    def test_host_bits_are_cleared(self) -> None:
        """``10.244.0.99/24`` means 10.244.0.0/24, as in the userspace filter."""
        assert build_program(["10.244.0.99/24"]) == build_program(["10.244.0.0/24"])

    def test_keep_is_all_ones(self) -> None:
        """The keep verdict is 0xffffffff: a smaller one would truncate the message."""
        prog = build_program(["10.244.0.0/24"])
        assert {k for c, _a, _b, k in prog if c == bpf.BPF_RET | bpf.BPF_K} == {KEEP, DROP}

    def test_sizes(self) -> None:
        """Instruction counts stay near the documented per-CIDR costs, always valid."""
        base = len(build_program(["10.0.0.0/8"]))
        assert base < 60
        rnd = random.Random(1)
        v4 = [f"{ipaddress.IPv4Address(rnd.getrandbits(32))}/{rnd.randint(8, 32)}"
              for _ in range(1000)]
        merged = netaddr.cidr_merge(v4)
        # 1 instruction per single address, 2 per wider range, plus the splits.
        cost = sum(1 if n.size == 1 else 2 for n in merged)
        p4 = build_program(v4)
        assert (len(p4) - base) / cost < 1.25, len(p4)
        slash128 = [f"fd00:10:244::{i:x}/128" for i in range(0, 2000, 2)]
        p6 = build_program(slash128)
        assert (len(p6) - base) / 1000 < 1.4, len(p6)
        spread = [f"{ipaddress.IPv6Address(rnd.getrandbits(128))}/{rnd.randint(16, 128)}"
                  for _ in range(300)]
        assert (len(build_program(spread)) - base) / 300 < 10
        for p in (p4, p6):
            validate(p)

    def test_too_many_instructions(self) -> None:
        """More than MAX_INSNS instructions: ValueError saying so."""
        rnd = random.Random(2)
        spread = [f"{ipaddress.IPv6Address(rnd.getrandbits(128))}/128" for _ in range(600)]
        with pytest.raises(ValueError, match=f"more than the kernel's {MAX_INSNS}"):
            build_program(spread)


class TestRealMessages:
    CASES = [
        ["10.244.0.0/24", "fd00:10:244::/64"],
        ["10.244.0.10/32"],
        ["fd00:10:244::11/128"],
        ["fd00:10:244::10/128", "10.244.0.11/32"],
        # The node (reply destination after MASQUERADE) and the ext host
        # (original destination) are never an original source here.
        ["198.51.100.1/32", "2001:db8:100::1/128"],
        ["198.51.100.2/32", "2001:db8:100::2/128"],
        ["10.244.0.1/32"],
        ["0.0.0.0/0"],
        ["::/0"],
    ]

    @pytest.mark.parametrize("cidrs", CASES, ids=lambda c: ",".join(c))
    def test_verdict_matches_decoder(self, cidrs: list[str]) -> None:
        """Every captured message (v4/v6, every protocol, NEW/UPDATE/DESTROY/dump) is
        kept exactly when its decoded original source is in the CIDRs."""
        prog = build_program(cidrs)
        for m in MESSAGES:
            assert run_program(prog, m) == oracle(cidrs, m), m.hex()

    def test_reply_and_destination_addresses_are_ignored(self) -> None:
        """A pod address in the reply tuple or as original destination keeps nothing."""
        cidrs = ["10.244.0.0/24", "fd00:10:244::/64"]
        prog = build_program(cidrs)
        for m in MESSAGES:
            pod = 0x0AF4_0063 if m[16] == socket.AF_INET else int(
                ipaddress.IPv6Address("fd00:10:244::63"))
            outside = 0xC633_6499 if m[16] == socket.AF_INET else int(
                ipaddress.IPv6Address("2001:db8:100::99"))
            x = with_addr(m, "orig_src", outside)
            for name in ("orig_dst", "reply_src", "reply_dst"):
                x = with_addr(x, name, pod)
            assert run_program(prog, x) == DROP
            assert run_program(prog, with_addr(x, "orig_src", pod)) == KEEP


class TestManyCidrs:
    @pytest.mark.parametrize("seed", [3, 4])
    def test_v4_boundaries_with_trampolines(self, seed: int) -> None:
        """With 500 CIDRs (far jumps need trampolines) the first and last address of
        every CIDR and both neighbours get the decoder + netaddr verdict."""
        rnd = random.Random(seed)
        cidrs = [f"{ipaddress.IPv4Address(rnd.getrandbits(32))}/{rnd.choice([16, 24, 28, 32])}"
                 for _ in range(500)]
        prog = build_program(cidrs)
        assert len(prog) > 600  # many branches span more than 255 instructions
        ipset = netaddr.IPSet(cidrs)
        base = V4[0]
        for net in netaddr.cidr_merge(cidrs):
            for a in (net.first - 1, net.first, net.last, net.last + 1):
                a &= 0xFFFFFFFF
                want = KEEP if netaddr.IPAddress(a, 4) in ipset else DROP
                assert run_program(prog, with_addr(base, "orig_src", a)) == want, (net, a)

    def test_last_of_many_single_addresses(self) -> None:
        """The 300th /32 still matches (libnetfilter_conntrack loses those past ~86)."""
        cidrs = [f"10.{i // 250}.{i % 250}.7/32" for i in range(300)]
        prog = build_program(cidrs)
        for i in (0, 85, 86, 87, 150, 299):
            a = int(ipaddress.IPv4Address(f"10.{i // 250}.{i % 250}.7"))
            assert run_program(prog, with_addr(V4[0], "orig_src", a)) == KEEP
            assert run_program(prog, with_addr(V4[0], "orig_src", a + 1)) == DROP

    @pytest.mark.parametrize("seed", [5, 6])
    def test_v6_boundaries(self, seed: int) -> None:
        """500 IPv6 CIDRs of mixed lengths, clustered and spread: boundaries match."""
        rnd = random.Random(seed)
        cidrs = []
        for _ in range(500):
            hi = rnd.choice([0xFD00_0010_0244_0000, 0xFD00_0010_0244_0001,
                             rnd.getrandbits(64)])
            addr = (hi << 64) | rnd.getrandbits(64)
            cidrs.append(f"{ipaddress.IPv6Address(addr)}/{rnd.choice([48, 64, 96, 100, 128])}")
        prog = build_program(cidrs)
        ipset = netaddr.IPSet(cidrs)
        base = V6[0]
        mask = (1 << 128) - 1
        for net in netaddr.cidr_merge(cidrs):
            for a in (net.first - 1, net.first, net.last, net.last + 1):
                a &= mask
                want = KEEP if netaddr.IPAddress(a, 6) in ipset else DROP
                assert run_program(prog, with_addr(base, "orig_src", a)) == want, (net, a)

    def test_all_branches_in_range(self) -> None:
        """The assembler never emits an offset over 255 (the 8-bit jt/jf fields)."""
        rnd = random.Random(7)
        cidrs = [f"{ipaddress.IPv4Address(rnd.getrandbits(32))}/32" for _ in range(1500)]
        prog = build_program(cidrs)
        assert cond_jumps(prog) > 1500
        assert all(0 <= jt <= 255 and 0 <= jf <= 255 for _c, jt, jf, _k in prog)
        validate(prog)


class TestFailOpen:
    PROG = build_program(["10.244.0.0/24", "fd00:10:244::/64"])
    # Only the node address: a real message would be dropped.
    NODE = build_program(["198.51.100.1/32", "2001:db8:100::1/128"])

    def test_non_flow_messages_are_kept(self) -> None:
        """NLMSG_DONE / ERROR / NOOP, other subsystems and families, tiny packets: kept."""
        done = struct.pack("=IHHII", 20, 3, 2, 1, 0) + b"\0\0\0\0"
        error = struct.pack("=IHHIIi", 36, 2, 0, 1, 0, -1) + bytes(16)
        noop = struct.pack("=IHHII", 16, 1, 0, 0, 0)
        for pkt in (b"", b"\x01", bytes(19), done, error, noop):
            assert run_program(self.NODE, pkt) == KEEP, pkt.hex()
        m = V4[0]
        assert run_program(self.NODE, m) == DROP
        other_type = m[:4] + struct.pack("=H", 0x0200) + m[6:]  # CTNETLINK_EXP
        get_type = m[:4] + struct.pack("=H", 0x0101) + m[6:]  # IPCTNL_MSG_CT_GET
        other_family = m[:16] + bytes([7]) + m[17:]
        for pkt in (other_type, get_type, other_family):
            assert run_program(self.NODE, pkt) == KEEP

    def test_truncated_messages_are_kept(self) -> None:
        """A message shorter than its nlmsg_len, or cut (with a matching nlmsg_len)
        anywhere before the end of the original tuple, is kept."""
        for m in MESSAGES:
            assert run_program(self.NODE, m) == DROP
            (orig_len,) = struct.unpack_from("=H", m, 20)  # CTA_TUPLE_ORIG comes first
            for cut in range(len(m)):
                assert run_program(self.NODE, m[:cut]) == KEEP
                fixed = set_len(m[:cut])
                if cut < 20 + orig_len:
                    assert run_program(self.NODE, fixed) == KEEP, (m.hex(), cut)
                else:
                    # The original tuple is intact: the event is judged on it.
                    assert run_program(self.NODE, fixed) == DROP

    def test_several_messages_in_one_skb_are_kept(self) -> None:
        """A dump skb (several messages) is judged as a whole, so it is kept."""
        assert run_program(self.NODE, V4[0] + V4[1]) == KEEP

    def test_odd_source_attribute_is_kept(self) -> None:
        """A source attribute of the wrong size, or no original tuple: kept."""
        for m in MESSAGES:
            off = leaf_offset(m, "orig_src") - 4
            (alen,) = struct.unpack_from("=H", m, off)
            for bad in (4, alen - 1, alen + 4):
                x = m[:off] + struct.pack("=H", bad) + m[off + 2:]
                assert run_program(self.NODE, x) == KEEP
            # Rename CTA_TUPLE_ORIG (first attribute, at 20) to an unused type.
            x = m[:22] + struct.pack("=H", 0x8000 | 30) + m[24:]
            assert run_program(self.NODE, x) == KEEP

    def test_drop_implies_a_well_formed_non_pod_source(self) -> None:
        """Fuzz: a byte-mutated message is only dropped if header, type, family and the
        original source attribute are intact and the source is not a pod."""
        rnd = random.Random(8)
        pod4, pod6 = netaddr.IPNetwork("10.244.0.0/24"), netaddr.IPNetwork("fd00:10:244::/64")
        for _ in range(3000):
            m = bytearray(rnd.choice(MESSAGES))
            for _ in range(rnd.randint(1, 3)):
                m[rnd.randrange(len(m))] = rnd.randrange(256)
            pkt = bytes(m)
            if run_program(self.PROG, pkt) != DROP:
                continue
            length, mtype = struct.unpack_from("=IH", pkt)
            assert length == len(pkt) and mtype in (0x100, 0x102)
            fam = pkt[16]
            ev = decode_generic(pkt, 0, 0) if _decodes(pkt) else None
            src = _first_orig_src(pkt)
            assert src is not None
            assert netaddr.IPAddress(src, 4 if fam == 2 else 6) not in (
                pod4 if fam == 2 else pod6)
            if ev is not None:
                assert ev.orig_src == src


def _decodes(pkt: bytes) -> bool:
    try:
        decode_generic(pkt, 0, 0)
    except Exception:
        return False
    return True


def _first_orig_src(pkt: bytes) -> int | None:
    """Independent reference: orig tuple -> ip -> src by the kernel's first-match walk."""

    def find(start: int, end: int, atype: int) -> tuple[int, int] | None:
        off = start
        while end - off >= 4:
            alen, t = struct.unpack_from("=HH", pkt, off)
            if alen < 4 or alen > end - off:
                return None
            if t & 0x3FFF == atype:
                return off + 4, off + alen
            off += (alen + 3) & ~3
        return None

    fam = pkt[16]
    orig = find(20, len(pkt), 1)
    ip = orig and find(*orig, 1)
    src = ip and find(*ip, 1 if fam == 2 else 3)
    if not src:
        return None
    size = 4 if fam == 2 else 16
    if src[1] - src[0] != size:
        return None
    return int.from_bytes(pkt[src[0]:src[1]], "big")


class TestInterpreterAndChecker:
    def test_nlattr_semantics(self) -> None:
        """NLATTR searches from offset A for type X; NLATTR_NEST inside the attribute at
        A; both return the attribute's offset or 0 (kernel net/core/filter.c)."""
        m = V4[0]
        ad = bpf.SKF_AD_OFF
        prog = [(bpf.BPF_LDX | bpf.BPF_IMM, 0, 0, 1), (bpf.BPF_LD | bpf.BPF_IMM, 0, 0, 20),
                (bpf.BPF_LD | bpf.BPF_ABS, 0, 0, ad + bpf.SKF_AD_NLATTR),
                (bpf.BPF_LD | bpf.BPF_ABS, 0, 0, ad + bpf.SKF_AD_NLATTR_NEST),
                (bpf.BPF_RET | bpf.BPF_A, 0, 0, 0)]
        assert run_program(prog[:3] + prog[4:], m) == 20
        assert run_program(prog, m) == 24  # CTA_TUPLE_IP is the orig tuple's first
        missing = [(bpf.BPF_LDX | bpf.BPF_IMM, 0, 0, 99), *prog[1:3], prog[4]]
        assert run_program(missing, m) == 0

    def test_out_of_bounds_load_returns_zero(self) -> None:
        """A packet load past the end ends the program with 0 (drop), as in the kernel."""
        prog = [(bpf.BPF_LD | bpf.BPF_W | bpf.BPF_ABS, 0, 0, 2),
                (bpf.BPF_RET | bpf.BPF_K, 0, 0, KEEP)]
        assert run_program(prog, b"abcdef") == KEEP
        assert run_program(prog, b"abcde") == 0

    def test_checker_rejects_bad_programs(self) -> None:
        """Like the kernel: jumps out of range, M[] read before write, no final ret."""
        ret = (bpf.BPF_RET | bpf.BPF_K, 0, 0, 0)
        for prog, what in (
            ([], "length"),
            ([(bpf.BPF_JMP | bpf.BPF_JEQ, 5, 0, 0), ret], "out of range"),
            ([(bpf.BPF_LD | bpf.BPF_MEM, 0, 0, 1), ret], "before it is written"),
            ([(bpf.BPF_LD | bpf.BPF_IMM, 0, 0, 1)], "ret"),
            ([(0xFFFF, 0, 0, 0), ret], "opcode"),
        ):
            with pytest.raises(ValueError, match=what):
                validate(prog)


class TestSocket:
    def test_attach_replace_detach_on_a_netlink_socket(self) -> None:
        """A built program attaches to a netfilter netlink socket (no capability needed),
        replaces itself, and detaches; detaching twice is harmless."""
        try:
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)
        except OSError as exc:
            pytest.skip(f"no netlink: {exc}")
        with s:
            bpf.attach(s, build_program(["10.244.0.0/24"]))
            bpf.attach(s, build_program(["10.244.0.0/24", "fd00::/8"]))
            bpf.detach(s)
            bpf.detach(s)

    def test_kernel_refusal_is_a_source_error(self) -> None:
        """A program the local check accepts but the kernel refuses: SourceError."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            bpf.attach(s, [(bpf.BPF_RET | bpf.BPF_K, 0, 0, KEEP)])
            s.setsockopt(socket.SOL_SOCKET, 44, 1)  # SO_LOCK_FILTER
            with pytest.raises(SourceError, match="locked"):
                bpf.attach(s, [(bpf.BPF_RET | bpf.BPF_K, 0, 0, KEEP)])

    def test_ret_does_not_end_the_memory_check(self) -> None:
        """The kernel's M[] check lets a ret's state flow on; validate() agrees."""
        prog = [(bpf.BPF_JMP | bpf.BPF_JEQ, 2, 0, 0), (bpf.BPF_ST, 0, 0, 0),
                (bpf.BPF_JMP | bpf.BPF_JA, 0, 0, 1), (bpf.BPF_RET | bpf.BPF_K, 0, 0, 0),
                (bpf.BPF_LD | bpf.BPF_MEM, 0, 0, 0), (bpf.BPF_RET | bpf.BPF_A, 0, 0, 0)]
        with pytest.raises(ValueError, match="before it is written"):
            validate(prog)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            arr = (bpf._SockFilter * len(prog))(*(bpf._SockFilter(*i) for i in prog))
            with pytest.raises(OSError):
                s.setsockopt(socket.SOL_SOCKET, bpf.SO_ATTACH_FILTER,
                             bytes(bpf._SockFprog(len(prog), arr)))

    def test_large_programs_attach(self) -> None:
        """Programs near the size limit (v6 CIDRs spread out: trampolines everywhere)
        pass the kernel's checker."""
        rnd = random.Random(11)
        cidrs = [f"fd99:{rnd.getrandbits(16):x}:{rnd.getrandbits(16):x}::"
                 f"{rnd.getrandbits(16):x}/{rnd.choice([64, 112, 128])}" for _ in range(480)]
        cidrs += [f"{ipaddress.IPv4Address(rnd.getrandbits(32))}/32" for _ in range(300)]
        prog = build_program(cidrs)
        assert len(prog) > 3000
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            bpf.attach(s, prog)

    def test_malformed_program_is_a_value_error(self) -> None:
        """A malformed program never reaches the kernel."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, \
                pytest.raises(ValueError):
            bpf.attach(s, [(bpf.BPF_LD | bpf.BPF_IMM, 0, 0, 0)])


def attached(s: socket.socket) -> int:
    """Instructions of ``s``'s filter, as the kernel reports them (SO_GET_FILTER with a
    zero length returns the count); 0: no filter."""
    libc = ctypes.CDLL(None, use_errno=True)
    n = ctypes.c_uint32(0)
    if libc.getsockopt(s.fileno(), socket.SOL_SOCKET, bpf.SO_ATTACH_FILTER, None,
                       ctypes.byref(n)) != 0:
        raise OSError(ctypes.get_errno(), "SO_GET_FILTER")
    return n.value


class TestKernelFilter:
    def test_follows_the_cidrs_and_fails_open(self) -> None:
        """apply attaches the program for the CIDRs it gets, replaces it on the next call,
        and on a program that cannot be built removes the filter and counts the error."""
        m = Metrics()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            kf = bpf.KernelFilter(s, m)
            kf.apply(to_cidrs(["10.244.0.0/24"]))
            assert attached(s) == len(build_program(["10.244.0.0/24"]))
            kf.apply(to_cidrs(["10.244.0.0/24", "fd00::/8"]))
            assert attached(s) == len(build_program(["10.244.0.0/24", "fd00::/8"]))
            too_many = [f"fd99:{i:x}::{i:x}/128" for i in range(0, 40000, 7)]
            kf.apply(to_cidrs(too_many))
            assert attached(s) == 0
            assert m.value("shipper_errors_total", "kernel_filter", "ValueError") == 1

    def test_subscribed_to_the_cidr_filter(self) -> None:
        """Subscribed to a CidrFilter, it attaches at once and follows each pod CIDR change."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            f = CidrFilter(["10.244.0.0/24"], [])
            f.subscribe(bpf.KernelFilter(s, Metrics()).apply)
            assert attached(s) == len(build_program(["10.244.0.0/24"]))
            f.set_cidrs(["10.244.0.0/24", "10.245.0.0/24", "fd00::/8"], [])
            assert attached(s) == len(build_program(["10.244.0.0/24", "10.245.0.0/24",
                                                     "fd00::/8"]))


def ct_id_offset(msg: bytes) -> int:
    """Offset of the top-level CTA_ID attribute's header."""
    return leaf_offset(msg, "ct_id") - 4


class TestShares:
    """The share clause of sharded readers (``conntrack.workers``): CTA_ID mod N."""

    CIDRS = ["10.244.0.0/16", "fd00:10:244::/48", "192.168.0.0/16", "fd00::/8"]

    @pytest.mark.parametrize("n", [2, 3, 4])
    def test_every_message_is_kept_by_exactly_its_share(self, n: int) -> None:
        """With shares only, each captured message is kept by exactly one of N programs:
        worker ``CTA_ID mod N``."""
        progs = [build_program([], share=(k, n)) for k in range(n)]
        for m in MESSAGES:
            kept = [k for k, p in enumerate(progs) if run_program(p, m) == KEEP]
            assert kept == [bpf.share_of(decode_generic(m, 0, 0).ct_id, n)], m.hex()

    @pytest.mark.parametrize("cidrs", [CIDRS, ["10.244.0.0/24"], ["fd00::/8"]])
    def test_share_and_pod_cidr_test_combine(self, cidrs: list[str]) -> None:
        """With CIDRs, a share keeps a message iff it is in the share and the CIDR
        program alone keeps it."""
        alone = build_program(cidrs)
        progs = [build_program(cidrs, share=(k, 2)) for k in range(2)]
        for m in MESSAGES:
            mine = bpf.share_of(decode_generic(m, 0, 0).ct_id, 2)
            for k, p in enumerate(progs):
                want = run_program(alone, m) if k == mine else DROP
                assert run_program(p, m) == want

    def test_both_shares_are_used(self) -> None:
        """The captured flows' ids spread over both shares (the key is a hash)."""
        shares = {bpf.share_of(decode_generic(m, 0, 0).ct_id, 2) for m in MESSAGES}
        assert shares == {0, 1}

    def test_message_without_id_goes_to_worker_0_only(self) -> None:
        """A flow message without CTA_ID (renamed to an unused type) or with an odd-sized
        one is kept by worker 0 and dropped by the others, so it is read exactly once."""
        progs = [build_program(self.CIDRS, share=(k, 3)) for k in range(3)]
        for m in MESSAGES:
            off = ct_id_offset(m)
            renamed = m[:off + 2] + struct.pack("=H", 30) + m[off + 4:]
            odd = m[:off] + struct.pack("=H", 6) + m[off + 2:]
            for x in (renamed, odd):
                verdicts = [run_program(p, x) for p in progs]
                assert verdicts[1:] == [DROP, DROP]
                assert verdicts[0] == run_program(build_program(self.CIDRS), x)

    def test_non_flow_messages_go_to_worker_0_only(self) -> None:
        """NLMSG_DONE / ERROR, other types, tiny and multi-message skbs: worker 0 keeps
        them, the others drop them."""
        done = struct.pack("=IHHII", 20, 3, 2, 1, 0) + b"\0\0\0\0"
        error = struct.pack("=IHHIIi", 36, 2, 0, 1, 0, -1) + bytes(16)
        m = V4[0]
        get_type = m[:4] + struct.pack("=H", 0x0101) + m[6:]
        for pkt in (b"", bytes(19), done, error, get_type, V4[0] + V4[1], m[:40]):
            assert run_program(build_program(self.CIDRS, share=(0, 2)), pkt) == KEEP
            assert run_program(build_program(self.CIDRS, share=(1, 2)), pkt) == DROP

    def test_fuzzed_messages_are_never_kept_twice_nor_by_nobody_without_cidrs(self) -> None:
        """Fuzz: for any byte-mutated message, exactly one of the share-only programs
        keeps it (disjoint and complete even for garbage)."""
        rnd = random.Random(18)
        progs = [build_program([], share=(k, 3)) for k in range(3)]
        for _ in range(2000):
            m = bytearray(rnd.choice(MESSAGES))
            for _ in range(rnd.randint(1, 3)):
                m[rnd.randrange(len(m))] = rnd.randrange(256)
            assert sum(run_program(p, bytes(m)) == KEEP for p in progs) == 1

    def test_one_worker_is_no_share(self) -> None:
        """share=(0, 1) builds exactly the program without shares."""
        assert build_program(self.CIDRS, share=(0, 1)) == build_program(self.CIDRS)
        assert build_program([], share=(0, 1)) == build_program([])

    def test_bad_share_is_a_value_error(self) -> None:
        """A share index outside 0..n-1 or n < 1 is rejected."""
        for share in ((2, 2), (-1, 2), (0, 0)):
            with pytest.raises(ValueError, match="share"):
                build_program([], share=share)

    def test_both_byte_orders(self) -> None:
        """The share clause reads nla_len host-endian: a big-endian host's program keeps
        the same share of the byte-swapped headers."""
        prog = build_program([], share=(1, 2), byteorder="big")
        for m in MESSAGES[:5]:
            off = ct_id_offset(m)
            # Swap every netlink header the program reads to big-endian.
            be = bytearray(m)
            be[0:4] = struct.pack(">I", len(m))
            be[4:6] = struct.pack(">H", struct.unpack_from("=H", m, 4)[0])
            for aoff in _top_level_attrs(m):
                alen, atype = struct.unpack_from("=HH", m, aoff)
                be[aoff:aoff + 4] = struct.pack(">HH", alen, atype)
            verdict = run_program(prog, bytes(be), byteorder="big")
            want = KEEP if bpf.share_of(decode_generic(m, 0, 0).ct_id, 2) == 1 else DROP
            assert verdict == want, off

    def test_kernel_accepts_share_programs(self) -> None:
        """The kernel's checker takes BPF_MOD share programs (with and without CIDRs)."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for prog in (build_program([], share=(1, 3)),
                         build_program(self.CIDRS, share=(0, 2))):
                bpf.attach(s, prog)
                assert attached(s) == len(prog)


def _top_level_attrs(m: bytes) -> list[int]:
    out, off = [], 20
    while off + 4 <= len(m):
        alen = struct.unpack_from("=H", m, off)[0]
        if alen < 4:
            break
        out.append(off)
        off += (alen + 3) & ~3
    return out


class TestKernelFilterShares:
    def test_share_survives_a_failed_cidr_program(self) -> None:
        """With a share, a CIDR program that cannot be built falls back to the share
        clause alone (never to no filter: that would duplicate the other shares)."""
        m = Metrics()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            kf = bpf.KernelFilter(s, m, share=(1, 2))
            kf.apply(to_cidrs(["10.244.0.0/24"]))
            assert attached(s) == len(build_program(["10.244.0.0/24"], share=(1, 2)))
            too_many = [f"fd99:{i:x}::{i:x}/128" for i in range(0, 40000, 7)]
            kf.apply(to_cidrs(too_many))
            assert attached(s) == len(build_program([], share=(1, 2)))
            assert m.value("shipper_errors_total", "kernel_filter", "ValueError") == 1
