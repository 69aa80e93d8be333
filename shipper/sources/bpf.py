"""In-kernel pre-filter for conntrack events: a classic-BPF socket filter.

Why: on a gateway node most conntrack events are not from pods (node traffic,
NodePort / service traffic, forwarded transit flows). Filtering them in
Python costs CPU per event and, worse, they fill the socket's receive queue:
a burst of them causes ENOBUFS and the kernel then drops *pod* events too.
A socket filter runs before the receive-buffer check, so a dropped event is
never queued, never read and never counted as an overrun.

Public API (pure Python + ``ctypes``/``struct``, no dependencies):

* :func:`build_program` compiles pod CIDRs into a classic-BPF program;
* :func:`attach` / :func:`detach` install / remove it on a socket
  (``SO_ATTACH_FILTER`` replaces an existing filter atomically);
* :func:`run_program` is a pure interpreter of classic BPF, including the
  netlink attribute searches, for tests and debugging;
* :func:`validate` performs the kernel's structural checks.

What the program decides (the contract). It **drops** (``RET 0``) exactly
the single-message ctnetlink flow events (``IPCTNL_MSG_CT_NEW`` /
``IPCTNL_MSG_CT_DELETE``, family AF_INET / AF_INET6) whose
``CTA_TUPLE_ORIG -> CTA_TUPLE_IP -> CTA_IP_V{4,6}_SRC`` address is well formed
and not in a pod CIDR. Everything else is **kept** (``RET 0xffffffff``; a
smaller value would truncate the message): flows from pod CIDRs, and, failing
open so that userspace decides and counts, every message that is not such an
event or does not look exactly as expected: NLMSG_DONE / NLMSG_ERROR, other
subsystems and families, a missing or odd-sized source attribute, a truncated
message, and an skb carrying several messages (a dump), since a filter can
only accept or reject the whole skb. Only the *original* source is looked at:
after MASQUERADE the reply tuple carries the node address, and a flow *to* a
pod carries the pod address as a destination; neither makes a flow "from a
pod".

Instruction layout (see :func:`build_program`)::

    header   ld len; len >= 20?; nlmsg_len (host-endian) == len?;
             nlmsg_type in {CT_NEW, CT_DELETE}?; nfgen_family -> V4 | V6 | keep
    V4/V6    ldx #CTA_TUPLE_ORIG; ld #20; ld nlattr      (search the top level)
             ldx #CTA_TUPLE_IP;         ld nlattr_nest  (inside the orig tuple)
             ldx #CTA_IP_V*_SRC;        ld nlattr_nest
             tax; ldh [x+0] == 8 | 20 (host-endian nla_len)?; load the address
             (every "not found" / "odd size" branch keeps)
    match    a search tree over the address words (below); leaves keep / drop
    KEEP     ret #0xffffffff
    DROP     ret #0

The ancillary loads follow the kernel (``bpf_skb_get_nlattr`` /
``bpf_skb_get_nlattr_nest`` in ``net/core/filter.c``): the attribute *type*
is taken from X, the *offset* from A; the result (A) is the offset of the
attribute found, or 0. ``nlattr`` walks attributes from offset A to the end
of the skb; ``nlattr_nest`` walks the payload of the attribute at offset A.
Both accept an attribute only if it lies inside the skb, so after checking
the source attribute's ``nla_len`` the address loads can never run past the
end of the packet (an out-of-bounds load would abort the program with 0,
i.e. silently *drop*).

Matching. CIDRs are merged (:func:`shipper.cidrs.merge`), so they are
disjoint. The address is matched 32-bit word by word (v4 is one word, kept in
A; v6 has four words, each loaded once from the packet into ``M[0..3]``). At
each word the candidates are disjoint intervals on that word: a CIDR ending
in this word is a range ``[lo, hi]`` (one ``jeq`` for a single value, else
``jge``/``jgt``; ranges need no mask, so A is never modified), and CIDRs
longer than the word are grouped by the word's exact value and matched by a
``jeq`` followed by the same scheme on the next word. Long interval lists are
searched by binary splits (``jge #lo``) down to short linear runs, so an
event runs about ``log2(n) + 8`` comparisons per word even with thousands of
CIDRs. Conditional jumps are forward-only with 8-bit offsets; the assembler
(:class:`_Asm`) therefore rewrites every too-far branch to a nearby
trampoline (a copy of the target ``ret``, or a ``ja`` with its 32-bit
offset), reusing one trampoline for all branches within reach: this is the
bug libnetfilter_conntrack has (its offsets wrap, losing addresses after
about 86 entries).

Sizes (checked by the unit tests), after merging: IPv4 about 1.2
instructions per single address and 2.4 per wider range; IPv6 about 1.2 per
CIDR when CIDRs share their leading words (e.g. /128s in one /64), up to
about 8-10 for CIDRs with nothing in common; fixed part about 60. So roughly
3,000 IPv4 /32s, 1,600 IPv4 ranges, 3,000 clustered or 400 scattered IPv6
CIDRs fit. The kernel limit is 4096 instructions
(:data:`MAX_INSNS`); :func:`build_program` raises ValueError beyond it. The
program is charged to ``net.core.optmem_max`` of the socket's namespace
(about 8-16 bytes per instruction after the kernel's conversion; a replace
briefly charges the old and the new program together).

Shares (sharded readers, ``conntrack.workers: N``): with ``share=(k, N)``
the program first keeps only flow events whose top-level ``CTA_ID`` is ``k``
modulo N (``BPF_ALU|BPF_MOD``), and sends every message without a share key
(no or odd CTA_ID, not a single ctnetlink flow event) to worker 0 only; the
readers' shares are therefore disjoint and together complete
(:func:`share_of`). Then the pod-CIDR test as above.

Empty CIDR list: :func:`build_program` returns ``[RET 0xffffffff]`` (keep
everything; with a share, only the share clause). The userspace filter then
decides; this avoids black-holing all events while dynamic pod CIDRs are still
being discovered. A caller may also simply not attach.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import logging
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from shipper.cidrs import Cidr, Network, merge, to_cidrs
from shipper.errors import SourceError

if TYPE_CHECKING:
    from shipper.metrics import Metrics

log = logging.getLogger("shipper.sources.bpf")

Insn = tuple[int, int, int, int]
"""One classic-BPF instruction: ``(code, jt, jf, k)`` as in ``struct sock_filter``."""

ByteOrder = Literal["little", "big"]

# Classic BPF opcodes (linux/filter.h, linux/bpf_common.h).
BPF_LD, BPF_LDX, BPF_ST, BPF_STX, BPF_ALU, BPF_JMP, BPF_RET, BPF_MISC = range(8)
BPF_W, BPF_H, BPF_B = 0x00, 0x08, 0x10
BPF_IMM, BPF_ABS, BPF_IND, BPF_MEM, BPF_LEN, BPF_MSH = 0x00, 0x20, 0x40, 0x60, 0x80, 0xA0
BPF_ADD, BPF_SUB, BPF_MUL, BPF_DIV, BPF_OR, BPF_AND = 0x00, 0x10, 0x20, 0x30, 0x40, 0x50
BPF_LSH, BPF_RSH, BPF_NEG, BPF_MOD, BPF_XOR = 0x60, 0x70, 0x80, 0x90, 0xA0
BPF_JA, BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET = 0x00, 0x10, 0x20, 0x30, 0x40
BPF_K, BPF_X, BPF_A = 0x00, 0x08, 0x10
BPF_TAX, BPF_TXA = 0x00, 0x80
BPF_MEMWORDS = 16
#: The kernel's limit on classic-BPF program length (BPF_MAXINSNS).
MAX_INSNS = 4096

SKF_AD_OFF = 0xFFFFF000  # -0x1000 as the u32 ``k`` of an absolute load
SKF_AD_NLATTR = 12
SKF_AD_NLATTR_NEST = 16

SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27

#: ``RET`` value that keeps the whole message (a smaller one truncates it).
KEEP = 0xFFFFFFFF
#: ``RET`` value that drops the message before it is queued.
DROP = 0

# netlink / ctnetlink constants used by the program (see shipper.sources.decode).
_NLMSG_HDRLEN = 16
_CT_HDRLEN = 20  # nlmsghdr + nfgenmsg
_MSG_CT_NEW = 0x0100
_MSG_CT_DELETE = 0x0102
_AF_INET = 2
_AF_INET6 = 10
_CTA_TUPLE_ORIG = 1
_CTA_TUPLE_IP = 1
_CTA_IP_V4_SRC = 1
_CTA_IP_V6_SRC = 3
_CTA_ID = 12
_NLA_TYPE_MASK = 0x3FFF
_WORD = 0xFFFFFFFF

#: Longest run of intervals matched linearly before splitting (size vs. run time).
_LINEAR_MAX = 6

_SD = sys.byteorder


def _bswap16(v: int) -> int:
    return ((v & 0xFF) << 8) | (v >> 8)


def _he16(v: int, byteorder: ByteOrder) -> int:
    """``v`` as ``ldh`` (a big-endian load) sees a host-endian u16 holding ``v``."""
    return v if byteorder == "big" else _bswap16(v)


# --------------------------------------------------------------------- assembler
class _Label:
    """A position in the program; jumps name labels, the assembler computes offsets."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


@dataclass(slots=True, eq=False)
class _Op:
    """One instruction; ``jt`` / ``jf`` name a label or an instruction (None: the next one).

    For ``ja`` the target is ``jt`` and ``k`` is computed; for conditional
    jumps ``k`` is the operand.
    """

    code: int
    k: int = 0
    jt: _Label | _Op | None = None
    jf: _Label | _Op | None = None


_Target = _Label | _Op


def _is_cond(code: int) -> bool:
    return code & 0x07 == BPF_JMP and code & 0xF0 != BPF_JA


def _is_ja(code: int) -> bool:
    return code == BPF_JMP | BPF_JA


class _Asm:
    """Collects instructions and labels; :meth:`assemble` resolves jumps with trampolines."""

    def __init__(self) -> None:
        self.items: list[_Op | _Label] = []
        self._n = 0

    def label(self, name: str) -> _Label:
        """A new, not yet placed, label."""
        self._n += 1
        return _Label(f"{name}{self._n}")

    def place(self, label: _Label) -> None:
        """Put ``label`` at the next instruction."""
        self.items.append(label)

    def op(self, code: int, k: int = 0, jt: _Label | None = None,
           jf: _Label | None = None) -> None:
        """Append one instruction."""
        self.items.append(_Op(code, k & _WORD, jt, jf))

    def ja(self, target: _Label) -> None:
        """Append an unconditional jump."""
        self.items.append(_Op(BPF_JMP | BPF_JA, 0, target, None))

    def assemble(self) -> list[Insn]:
        """Resolve labels into offsets, redirecting branches over 255 to trampolines.

        Far branches are handled from the last one backwards: a branch first
        tries to reuse an equivalent instruction within reach (a copy of the
        target ``ret``, or a ``ja`` to the same place, typically a trampoline
        made for a later branch), else a trampoline is inserted right after
        it. Reuse changes no positions, so a pass fixes every far branch it
        can by reuse and stops at the first insertion; insertions only
        lengthen jumps, so the passes converge (and are bounded anyway).
        """
        for _ in range(4 * MAX_INSNS):
            ops: list[tuple[int, _Op]] = []  # (item index, op) in program order
            pos: dict[int, int] = {}  # id(label or op) -> pc
            for idx, it in enumerate(self.items):
                if isinstance(it, _Label):
                    pos[id(it)] = len(ops)
                else:
                    pos[id(it)] = len(ops)
                    ops.append((idx, it))
            if len(ops) > 2 * MAX_INSNS:
                break  # hopeless; build_program reports the size
            far: list[tuple[int, str]] = []
            for pc, (_idx, op) in enumerate(ops):
                if _is_ja(op.code):
                    if op.jt is None or pos[id(op.jt)] <= pc:
                        raise AssertionError(f"bad ja at {pc}")
                    continue
                if not _is_cond(op.code):
                    continue
                for branch in ("jt", "jf"):
                    target = getattr(op, branch)
                    if target is None:
                        continue
                    off = pos[id(target)] - pc - 1
                    if off < 0:
                        raise AssertionError(f"backward branch at {pc} to {target}")
                    if off > 255:
                        far.append((pc, branch))
            if not far:
                return self._emit(ops, pos)
            for pc, branch in reversed(far):
                if not self._fix(ops, pos, pc, branch):
                    break  # positions changed: recompute
        raise ValueError("program too large to assemble")

    def _fix(self, ops: list[tuple[int, _Op]], pos: dict[int, int], pc: int,
             branch: str) -> bool:
        """Redirect one far branch; False if an instruction was inserted."""
        idx, op = ops[pc]
        target: _Target = getattr(op, branch)
        tpc = pos[id(target)]
        tgt = ops[tpc][1]
        is_ret = tgt.code & 0x07 == BPF_RET
        # Reuse the nearest equivalent instruction within reach.
        for cpc in range(pc + 1, min(pc + 257, len(ops))):
            cand = ops[cpc][1]
            if (cand.code == tgt.code and cand.k == tgt.k) if is_ret else (
                    _is_ja(cand.code) and cand.jt is not None and pos[id(cand.jt)] == tpc):
                setattr(op, branch, cand)
                return True
        # Otherwise put a trampoline right after this branch, where nothing
        # falls through into it (the branch's other arm is redirected past it).
        tramp = _Op(tgt.code, tgt.k) if is_ret else _Op(BPF_JMP | BPF_JA, 0, target, None)
        after = self.label("after")
        other = "jf" if branch == "jt" else "jt"
        if getattr(op, other) is None:
            setattr(op, other, after)
        setattr(op, branch, tramp)
        self.items[idx + 1:idx + 1] = [tramp, after]
        return False

    @staticmethod
    def _emit(ops: list[tuple[int, _Op]], pos: dict[int, int]) -> list[Insn]:
        out: list[Insn] = []
        for pc, (_idx, op) in enumerate(ops):
            if _is_ja(op.code):
                assert op.jt is not None
                out.append((op.code, 0, 0, pos[id(op.jt)] - pc - 1))
            elif _is_cond(op.code):
                jt = 0 if op.jt is None else pos[id(op.jt)] - pc - 1
                jf = 0 if op.jf is None else pos[id(op.jf)] - pc - 1
                out.append((op.code, jt, jf, op.k))
            else:
                out.append((op.code, 0, 0, op.k))
        return out


# ------------------------------------------------------------------ matching
@dataclass(frozen=True, slots=True)
class _Entry:
    """An interval ``[lo, hi]`` on one address word; ``child`` None means "keep"."""

    lo: int
    hi: int
    child: tuple[tuple[int, int], ...] | None  # (prefixlen, address) pairs, next word


def _entries(nets: Sequence[tuple[int, int]], depth: int, words: int) -> list[_Entry]:
    """The sorted, disjoint intervals on word ``depth`` for ``(prefixlen, address)`` pairs."""
    shift = 32 * (words - 1 - depth)
    terms: list[tuple[int, int]] = []
    groups: dict[int, list[tuple[int, int]]] = {}
    for plen, addr in nets:
        rem = plen - 32 * depth
        w = (addr >> shift) & _WORD
        if rem <= 32:
            size = 1 << (32 - rem)
            lo = w & ~(size - 1) & _WORD
            terms.append((lo, lo + size - 1))
        else:
            groups.setdefault(w, []).append((plen, addr))
    terms.sort()
    merged: list[tuple[int, int]] = []
    for lo, hi in terms:  # adjacent CIDRs become one range (10.0.0.0/24 + 10.0.1.0/25)
        if merged and merged[-1][1] + 1 >= lo:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    out = [_Entry(lo, hi, None) for lo, hi in merged]
    out += [_Entry(w, w, tuple(g)) for w, g in groups.items()]
    out.sort(key=lambda e: e.lo)
    for a, b in itertools.pairwise(out):
        if a.hi >= b.lo:  # merged CIDRs are disjoint
            raise AssertionError("overlapping intervals")
    return out


def _emit_word(asm: _Asm, nets: Sequence[tuple[int, int]], depth: int, words: int,
               keep: _Label, drop: _Label, a_holds_word: bool) -> None:
    """Emit the match of word ``depth``; every path ends in ``keep`` or ``drop``."""
    if not a_holds_word:
        asm.op(BPF_LD | BPF_MEM, depth)
    entries = _entries(nets, depth, words)
    if not entries:
        asm.ja(drop)
        return
    _search(asm, entries, depth, words, keep, drop)


def _search(asm: _Asm, entries: list[_Entry], depth: int, words: int, keep: _Label,
            drop: _Label) -> None:
    """A holds word ``depth``; emit a binary split / linear match over ``entries``."""
    if len(entries) > _LINEAR_MAX:
        m = len(entries) // 2
        right = asm.label("ge")
        asm.op(BPF_JMP | BPF_JGE | BPF_K, entries[m].lo, right, None)
        _search(asm, entries[:m], depth, words, keep, drop)
        asm.place(right)
        _search(asm, entries[m:], depth, words, keep, drop)
        return
    for i, e in enumerate(entries):
        last = i == len(entries) - 1
        nxt = drop if last else asm.label("next")
        if e.child is not None:
            asm.op(BPF_JMP | BPF_JEQ | BPF_K, e.lo, None, nxt)
            # Entries are disjoint: once this word matched a group exactly, no
            # other entry can match, so the child ends in keep / drop itself.
            _emit_word(asm, e.child, depth + 1, words, keep, drop, a_holds_word=False)
        elif e.lo == e.hi:
            asm.op(BPF_JMP | BPF_JEQ | BPF_K, e.lo, keep, nxt)
        elif e.lo == 0 and e.hi == _WORD:
            asm.ja(keep)
        elif e.lo == 0:
            asm.op(BPF_JMP | BPF_JGT | BPF_K, e.hi, nxt, keep)
        else:
            # Sorted ascending: below this range means below all later ones.
            asm.op(BPF_JMP | BPF_JGE | BPF_K, e.lo, None, drop)
            if e.hi != _WORD:
                asm.op(BPF_JMP | BPF_JGT | BPF_K, e.hi, nxt, keep)
            else:
                asm.ja(keep)
        if not last:
            asm.place(nxt)


# ------------------------------------------------------------------- program
def _emit_family(asm: _Asm, nets: Sequence[Network],
                 v6: bool, keep: _Label, drop: _Label, byteorder: ByteOrder) -> None:
    """Find the original source address of the event and match it."""
    lsrc = 20 if v6 else 8
    # CTA_TUPLE_ORIG at the top level (A = 20: after nlmsghdr + nfgenmsg).
    asm.op(BPF_LDX | BPF_W | BPF_IMM, _CTA_TUPLE_ORIG)
    asm.op(BPF_LD | BPF_W | BPF_IMM, _CT_HDRLEN)
    asm.op(BPF_LD | BPF_W | BPF_ABS, SKF_AD_OFF + SKF_AD_NLATTR)
    asm.op(BPF_JMP | BPF_JEQ | BPF_K, 0, keep, None)
    # ... its CTA_TUPLE_IP, and in there the source address.
    asm.op(BPF_LDX | BPF_W | BPF_IMM, _CTA_TUPLE_IP)
    asm.op(BPF_LD | BPF_W | BPF_ABS, SKF_AD_OFF + SKF_AD_NLATTR_NEST)
    asm.op(BPF_JMP | BPF_JEQ | BPF_K, 0, keep, None)
    asm.op(BPF_LDX | BPF_W | BPF_IMM, _CTA_IP_V6_SRC if v6 else _CTA_IP_V4_SRC)
    asm.op(BPF_LD | BPF_W | BPF_ABS, SKF_AD_OFF + SKF_AD_NLATTR_NEST)
    asm.op(BPF_JMP | BPF_JEQ | BPF_K, 0, keep, None)
    asm.op(BPF_MISC | BPF_TAX)
    # nla_len must be exactly the address attribute's: then the loads below
    # stay inside an attribute the kernel verified to lie inside the skb.
    asm.op(BPF_LD | BPF_H | BPF_IND, 0)
    asm.op(BPF_JMP | BPF_JEQ | BPF_K, _he16(lsrc, byteorder), None, keep)
    if not v6:
        asm.op(BPF_LD | BPF_W | BPF_IND, 4)  # A = address; range tests never modify A
        _emit_word(asm, [(n.prefixlen, int(n.network_address)) for n in nets], 0, 1,
                   keep, drop, a_holds_word=True)
        return
    for w in (3, 2, 1, 0):  # word 0 last, so A already holds it for the first test
        asm.op(BPF_LD | BPF_W | BPF_IND, 4 + 4 * w)
        asm.op(BPF_ST, w)
    _emit_word(asm, [(n.prefixlen, int(n.network_address)) for n in nets], 0, 4,
               keep, drop, a_holds_word=True)


def share_of(ct_id: int | None, workers: int) -> int:
    """The worker whose share a flow is in: ``ct_id mod workers``; worker 0 without an id.

    The share key is the top-level CTA_ID of the ctnetlink message (u32, network
    order). Every event of one flow (NEW, UPDATE, DESTROY) and its table-dump
    entry carry the same id, and the kernel derives it from a keyed hash of the
    entry (``nf_ct_get_id``: siphash of its address and tuple), so it spreads
    evenly whatever the traffic. A message whose id cannot be found (or any
    message that is not a single ctnetlink flow event) belongs to worker 0, so
    it is read exactly once and never lost by every worker. The same rule is
    applied in userspace to table dumps (:meth:`ConntrackSource.dump`).
    """
    return 0 if ct_id is None else ct_id % workers


def _emit_share(asm: _Asm, share: tuple[int, int], other: _Label, drop: _Label,
                byteorder: ByteOrder) -> None:
    """Go on only with messages of share ``k`` of ``n`` (:func:`share_of`); A, X clobbered.

    A missing CTA_ID, or one whose ``nla_len`` is not 8, sends the message to
    ``other`` (worker 0's keep, the others' drop): the loads below then stay
    inside an attribute the kernel verified to lie inside the skb.
    """
    k, n = share
    asm.op(BPF_LDX | BPF_W | BPF_IMM, _CTA_ID)
    asm.op(BPF_LD | BPF_W | BPF_IMM, _CT_HDRLEN)
    asm.op(BPF_LD | BPF_W | BPF_ABS, SKF_AD_OFF + SKF_AD_NLATTR)
    asm.op(BPF_JMP | BPF_JEQ | BPF_K, 0, other, None)
    asm.op(BPF_MISC | BPF_TAX)
    asm.op(BPF_LD | BPF_H | BPF_IND, 0)
    asm.op(BPF_JMP | BPF_JEQ | BPF_K, _he16(8, byteorder), None, other)
    asm.op(BPF_LD | BPF_W | BPF_IND, 4)  # the id, network order: as ldw reads it
    asm.op(BPF_ALU | BPF_MOD | BPF_K, n)
    asm.op(BPF_JMP | BPF_JEQ | BPF_K, k, None, drop)


def build_program(pod_cidrs: Iterable[str | Network], *,
                  share: tuple[int, int] | None = None,
                  byteorder: ByteOrder = _SD) -> list[Insn]:
    """Compile ``pod_cidrs`` into a classic-BPF filter for a ctnetlink event socket.

    The program keeps (``RET 0xffffffff``) every event whose original source
    address is in ``pod_cidrs`` and every message it cannot classify, and
    drops (``RET 0``) flow events from other sources; see the module
    docstring for the exact contract. An empty list yields ``[RET
    0xffffffff]`` (keep everything).

    ``byteorder`` is the byte order of the host whose kernel runs the program
    (netlink headers are host-endian); only tests should change it.

    ``pod_cidrs`` are :class:`~shipper.cidrs.Cidr` values (taken as they
    are) or text (parsed by :func:`shipper.cidrs.to_cidrs`, host bits cleared
    as in the userspace filter). Raises ValueError naming every bad CIDR, or
    when the program would exceed the kernel's :data:`MAX_INSNS` instructions.

    ``share=(k, n)`` with ``n > 1`` (sharded readers, ``conntrack.workers``)
    also keeps only worker ``k``'s share: see :func:`share_of` for the rule
    (``CTA_ID mod n``; every message without a share key belongs to worker 0).
    The pod-CIDR test is applied within the share as without it.
    """
    cidrs = to_cidrs(pod_cidrs)  # CidrError (a ValueError) names every bad one
    merged = [c.network for c in merge(cidrs)]
    v4 = [n for n in merged if n.version == 4]
    v6 = [n for n in merged if n.version == 6]
    if share is not None:
        k, n = share
        if not (n >= 1 and 0 <= k < n):
            raise ValueError(f"share {k} of {n}: need 0 <= k < n")
        if n == 1:
            share = None
    if not v4 and not v6 and share is None:
        return [(BPF_RET | BPF_K, 0, 0, KEEP)]
    asm = _Asm()
    keep, drop = asm.label("KEEP"), asm.label("DROP")
    # Where a message that is not a single ctnetlink flow event goes: every reader
    # keeps it without shares; with shares only worker 0 does (exactly once).
    other = keep if share is None or share[0] == 0 else drop
    lv4, lv6, lct, lhdr = asm.label("V4"), asm.label("V6"), asm.label("CT"), asm.label("HDR")
    # Only a whole single message is judged: the skb length must equal nlmsg_len.
    asm.op(BPF_LD | BPF_W | BPF_LEN)
    if v6:
        # The kernel's M[] check lets a ``ret`` "fall through" (see validate):
        # a shared keep/drop trampoline inside the v6 match would make the
        # loads after it invalid unless M[] is written on every path.
        for w in range(4):
            asm.op(BPF_ST, w)
    asm.op(BPF_JMP | BPF_JGE | BPF_K, _CT_HDRLEN, None, other)  # makes loads < 20 safe
    if byteorder == "little":
        asm.op(BPF_LD | BPF_H | BPF_ABS, 2)  # high half of a little-endian nlmsg_len
        asm.op(BPF_JMP | BPF_JEQ | BPF_K, 0, None, other)
        asm.op(BPF_LD | BPF_B | BPF_ABS, 1)
        asm.op(BPF_ALU | BPF_LSH | BPF_K, 8)
        asm.op(BPF_MISC | BPF_TAX)
        asm.op(BPF_LD | BPF_B | BPF_ABS, 0)
        asm.op(BPF_ALU | BPF_OR | BPF_X)
        asm.op(BPF_MISC | BPF_TAX)
    else:
        asm.op(BPF_LD | BPF_W | BPF_ABS, 0)
        asm.op(BPF_MISC | BPF_TAX)
    asm.op(BPF_LD | BPF_W | BPF_LEN)
    asm.op(BPF_JMP | BPF_JEQ | BPF_X, 0, lhdr, other)
    asm.place(lhdr)
    asm.op(BPF_LD | BPF_H | BPF_ABS, 4)  # nlmsg_type, host-endian
    asm.op(BPF_JMP | BPF_JEQ | BPF_K, _he16(_MSG_CT_NEW, byteorder), lct, None)
    asm.op(BPF_JMP | BPF_JEQ | BPF_K, _he16(_MSG_CT_DELETE, byteorder), lct, other)
    asm.place(lct)
    if share is not None:
        _emit_share(asm, share, other, drop, byteorder)
    if v4 or v6:
        asm.op(BPF_LD | BPF_B | BPF_ABS, 16)  # nfgen_family
        asm.op(BPF_JMP | BPF_JEQ | BPF_K, _AF_INET, lv4, None)
        asm.op(BPF_JMP | BPF_JEQ | BPF_K, _AF_INET6, lv6, keep)
        asm.place(lv4)
        _emit_family(asm, v4, False, keep, drop, byteorder)
        asm.place(lv6)
        _emit_family(asm, v6, True, keep, drop, byteorder)
    # else shares only (no pod CIDRs known yet): the share's messages fall through to KEEP
    asm.place(keep)
    asm.op(BPF_RET | BPF_K, KEEP)
    asm.place(drop)
    asm.op(BPF_RET | BPF_K, DROP)
    prog = asm.assemble()
    if len(prog) > MAX_INSNS:
        raise ValueError(
            f"{len(cidrs)} pod CIDRs need {len(prog)} BPF instructions, more than the "
            f"kernel's {MAX_INSNS}: merge CIDRs or filter in userspace only")
    validate(prog)
    return prog


# ------------------------------------------------------------------ checker
def validate(program: Sequence[Insn]) -> None:
    """Check ``program`` as the kernel's ``bpf_check_classic`` does; ValueError if not.

    Checked: 1..4096 instructions, known opcodes, field ranges, jumps inside
    the program, ``M[]`` index < 16, no division by a constant 0, ends with
    ``ret``, and no ``M[]`` read before a write on some path.
    """
    n = len(program)
    if not 0 < n <= MAX_INSNS:
        raise ValueError(f"program length {n} is not in 1..{MAX_INSNS}")
    for pc, insn in enumerate(program):
        if len(insn) != 4:
            raise ValueError(f"insn {pc}: expected (code, jt, jf, k)")
        code, jt, jf, k = insn
        if not (0 <= code <= 0xFFFF and 0 <= jt <= 255 and 0 <= jf <= 255 and 0 <= k <= _WORD):
            raise ValueError(f"insn {pc}: field out of range: {insn}")
        if code not in _KNOWN:
            raise ValueError(f"insn {pc}: unknown opcode {code:#x}")
        cls = code & 0x07
        if cls == BPF_JMP:
            if code == BPF_JMP | BPF_JA:
                if k >= n - pc - 1:
                    raise ValueError(f"insn {pc}: ja out of range")
            elif pc + 1 + max(jt, jf) >= n:
                raise ValueError(f"insn {pc}: jump out of range")
        if code in (BPF_LD | BPF_MEM, BPF_LDX | BPF_MEM, BPF_ST, BPF_STX) and \
                k >= BPF_MEMWORDS:
            raise ValueError(f"insn {pc}: M[{k}] out of range")
        if code in (BPF_ALU | BPF_DIV | BPF_K, BPF_ALU | BPF_MOD | BPF_K) and k == 0:
            raise ValueError(f"insn {pc}: division by constant 0")
    if program[-1][0] & 0x07 != BPF_RET:
        raise ValueError("program does not end with ret")
    # M[] words written before each instruction, computed exactly as the
    # kernel's check_load_and_stores does. Note its quirk: a ``ret`` does not
    # end the flow, its state passes on to the next instruction, so a ``ret``
    # trampoline reached before the stores makes a following ``ld M[k]``
    # invalid. build_program therefore initialises M[] at the start.
    full = (1 << BPF_MEMWORDS) - 1
    masks = [full] * n
    memvalid = 0
    for pc, (code, jt, jf, k) in enumerate(program):
        memvalid &= masks[pc]
        if code in (BPF_ST, BPF_STX):
            memvalid |= 1 << k
        elif code in (BPF_LD | BPF_MEM, BPF_LDX | BPF_MEM):
            if not memvalid >> k & 1:
                raise ValueError(f"insn {pc}: M[{k}] may be read before it is written")
        elif code == BPF_JMP | BPF_JA:
            masks[pc + 1 + k] &= memvalid
            memvalid = full
        elif code & 0x07 == BPF_JMP:
            masks[pc + 1 + jt] &= memvalid
            masks[pc + 1 + jf] &= memvalid
            memvalid = full


_KNOWN = frozenset(
    [BPF_RET | BPF_K, BPF_RET | BPF_A, BPF_RET | BPF_X,
     BPF_MISC | BPF_TAX, BPF_MISC | BPF_TXA, BPF_ST, BPF_STX,
     BPF_LD | BPF_IMM, BPF_LD | BPF_MEM, BPF_LD | BPF_W | BPF_LEN,
     BPF_LDX | BPF_IMM, BPF_LDX | BPF_MEM, BPF_LDX | BPF_W | BPF_LEN, BPF_LDX | BPF_B | BPF_MSH,
     BPF_ALU | BPF_NEG, BPF_JMP | BPF_JA]
    + [BPF_LD | size | mode for size in (BPF_W, BPF_H, BPF_B) for mode in (BPF_ABS, BPF_IND)]
    + [BPF_ALU | op | src for op in (BPF_ADD, BPF_SUB, BPF_MUL, BPF_DIV, BPF_OR, BPF_AND,
                                     BPF_LSH, BPF_RSH, BPF_MOD, BPF_XOR) for src in (BPF_K, BPF_X)]
    + [BPF_JMP | op | src for op in (BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET)
       for src in (BPF_K, BPF_X)]
)


# -------------------------------------------------------------- interpreter
def _u16(pkt: bytes, off: int, byteorder: ByteOrder) -> int:
    return int.from_bytes(pkt[off:off + 2], byteorder)


def _nla_find(pkt: bytes, start: int, length: int, atype: int, byteorder: ByteOrder) -> int:
    """Kernel ``nla_find``: offset of the first attribute of ``atype`` in the range, else 0."""
    off, rem = start, length
    while rem >= 4:
        nla_len = _u16(pkt, off, byteorder)
        if nla_len < 4 or nla_len > rem:
            break
        if _u16(pkt, off + 2, byteorder) & _NLA_TYPE_MASK == atype:
            return off
        step = (nla_len + 3) & ~3
        off += step
        rem -= step
    return 0


def _nlattr(pkt: bytes, a: int, x: int, nest: bool, byteorder: ByteOrder) -> int:
    """``bpf_skb_get_nlattr`` / ``bpf_skb_get_nlattr_nest``: A = offset, X = type."""
    n = len(pkt)
    if n < 4 or a > n - 4:
        return 0
    if not nest:
        return _nla_find(pkt, a, n - a, x, byteorder)
    nla_len = _u16(pkt, a, byteorder)
    if nla_len > n - a:
        return 0
    return _nla_find(pkt, a + 4, nla_len - 4, x, byteorder)


def run_program(program: Sequence[Insn], packet: bytes, *,
                byteorder: ByteOrder = _SD) -> int:
    """Run a classic-BPF ``program`` on ``packet`` as the kernel does; return its verdict.

    Pure. Implements every classic opcode plus the ancillary loads
    ``SKF_AD_NLATTR`` and ``SKF_AD_NLATTR_NEST`` (other ancillary loads raise
    ValueError). Kernel semantics kept: packet loads are big-endian; a load
    past the end of the packet, or a division by zero, ends the program with
    0 (drop); netlink attribute headers are read in ``byteorder`` (the host's).
    The program is checked with :func:`validate` first.
    """
    validate(program)
    pkt = bytes(packet)
    n = len(pkt)
    a = x = 0
    mem = [0] * BPF_MEMWORDS
    pc = 0
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        cls = code & 0x07
        if cls == BPF_RET:
            src = code & 0x18
            return (k if src == BPF_K else a if src == BPF_A else x) & _WORD
        if cls in (BPF_LD, BPF_LDX):
            mode, size = code & 0xE0, code & 0x18
            if mode == BPF_IMM:
                v = k
            elif mode == BPF_MEM:
                v = mem[k]
            elif mode == BPF_LEN:
                v = n
            elif mode == BPF_MSH:
                if k >= n:
                    return 0
                v = (pkt[k] & 0x0F) * 4
            else:
                if mode == BPF_ABS and k >= SKF_AD_OFF:
                    if k - SKF_AD_OFF == SKF_AD_NLATTR:
                        a = _nlattr(pkt, a, x, False, byteorder)
                    elif k - SKF_AD_OFF == SKF_AD_NLATTR_NEST:
                        a = _nlattr(pkt, a, x, True, byteorder)
                    else:
                        raise ValueError(f"unsupported ancillary load {k - SKF_AD_OFF}")
                    continue
                off = k if mode == BPF_ABS else (x + k) & _WORD
                width = {BPF_W: 4, BPF_H: 2, BPF_B: 1}[size]
                if off + width > n:
                    return 0
                v = int.from_bytes(pkt[off:off + width], "big")
            if cls == BPF_LD:
                a = v
            else:
                x = v
        elif cls == BPF_ST:
            mem[k] = a
        elif cls == BPF_STX:
            mem[k] = x
        elif cls == BPF_ALU:
            op = code & 0xF0
            s = x if code & BPF_X else k
            if op == BPF_NEG:
                a = -a & _WORD
            elif op in (BPF_DIV, BPF_MOD) and s == 0:
                return 0
            else:
                a = _ALU[op](a, s) & _WORD
        elif cls == BPF_JMP:
            op = code & 0xF0
            if op == BPF_JA:
                pc += k
                continue
            s = x if code & BPF_X else k
            taken = (a == s if op == BPF_JEQ else a > s if op == BPF_JGT
                     else a >= s if op == BPF_JGE else bool(a & s))
            pc += jt if taken else jf
        elif cls == BPF_MISC:
            if code & 0xF8 == BPF_TXA:
                a = x
            else:
                x = a


_ALU: dict[int, Callable[[int, int], int]] = {
    BPF_ADD: lambda a, s: a + s,
    BPF_SUB: lambda a, s: a - s,
    BPF_MUL: lambda a, s: a * s,
    BPF_DIV: lambda a, s: a // s,
    BPF_MOD: lambda a, s: a % s,
    BPF_OR: lambda a, s: a | s,
    BPF_AND: lambda a, s: a & s,
    BPF_LSH: lambda a, s: a << (s & 31),
    BPF_RSH: lambda a, s: a >> (s & 31),
    BPF_XOR: lambda a, s: a ^ s,
}


# ------------------------------------------------------------------ sockets
class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def attach(sock: socket.socket, program: Sequence[Insn]) -> None:
    """Install ``program`` as ``sock``'s filter (SO_ATTACH_FILTER).

    An existing filter is replaced atomically: every message is judged by
    either the old or the new program, none passes unfiltered. Needs no
    capability. Raises ValueError if ``program`` is malformed (checked
    locally, see :func:`validate`), SourceError if the kernel refuses it
    (ENOMEM: it does not fit in ``net.core.optmem_max`` of the socket's
    namespace, counting the old filter during a replace; EPERM: the filter
    is locked with SO_LOCK_FILTER; EINVAL: rejected by the kernel's checker).
    """
    validate(program)
    arr = (_SockFilter * len(program))(*(_SockFilter(c, jt, jf, k) for c, jt, jf, k in program))
    fprog = _SockFprog(len(program), arr)
    try:
        # setsockopt copies the struct; `arr` stays alive until the call returns.
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))
    except OSError as exc:
        if exc.errno == errno.ENOMEM:
            hint = ("it does not fit in net.core.optmem_max of the socket's network namespace "
                    "(during a replace the old filter counts too); raise optmem_max or use "
                    "fewer / merged CIDRs")
        elif exc.errno == errno.EPERM:
            hint = "the socket's filter is locked (SO_LOCK_FILTER)"
        elif exc.errno == errno.EINVAL:
            hint = "the kernel's checker rejected the program"
        else:
            hint = exc.strerror or str(exc)
        raise SourceError(
            f"cannot attach the conntrack BPF filter ({len(program)} instructions): "
            f"{exc.strerror}: {hint}") from exc


def detach(sock: socket.socket) -> None:
    """Remove ``sock``'s filter (SO_DETACH_FILTER); a socket without one is left as is.

    Raises SourceError if the kernel refuses (EPERM: locked filter).
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return  # no filter attached: nothing to do
        raise SourceError(f"cannot detach the conntrack BPF filter: {exc.strerror}") from exc


class KernelFilter:
    """Keeps one socket's in-kernel filter in step with the pod CIDRs; fails open.

    Subscribe :meth:`apply` to the CIDR filter
    (:meth:`shipper.filters.cidr.CidrFilter.subscribe`): it is called with the
    pod CIDRs at once and after every change. SO_ATTACH_FILTER replaces the
    old program atomically. If the new program cannot be built or attached,
    the filter is removed rather than left stale: a stale program would drop
    a new subnet's events unseen, while no program only costs CPU (userspace
    still filters). Failures are counted in
    ``shipper_errors_total{stage="kernel_filter"}`` and logged.
    """

    def __init__(self, sock: socket.socket, metrics: Metrics,
                 share: tuple[int, int] | None = None) -> None:
        """``sock``: the conntrack event socket (owned by the caller); ``share``: this
        reader's share ``(k, n)`` of the flows (sharded readers), None for all."""
        self._sock = sock
        self._metrics = metrics
        self._share = share if share is not None and share[1] > 1 else None
        self._lock = threading.Lock()

    def apply(self, pod_cidrs: Sequence[Cidr]) -> None:
        """(Re)attach the program for ``pod_cidrs``; on failure detach (userspace filters).

        With a share, failing open must not mean "every flow": the other readers
        ship the rest, so this one would duplicate them. The fallback is then the
        share clause alone (a dozen instructions); if even that cannot be
        attached, SourceError is raised (the reader cannot run correctly).
        """
        with self._lock:
            try:
                program = build_program(pod_cidrs, share=self._share)
                attach(self._sock, program)
            except (ValueError, SourceError, OSError) as exc:
                self._metrics.inc("shipper_errors_total", "kernel_filter", type(exc).__name__)
                if self._share is not None:
                    log.error("in-kernel filter not attached; this reader's share is kept "
                              "by the share clause alone, every pod-CIDR test is done in "
                              "userspace", extra={"fields": {"error": str(exc)}})
                    attach(self._sock, build_program([], share=self._share))  # or raise
                    return
                log.error("in-kernel filter not attached; every event is read and filtered "
                          "in userspace", extra={"fields": {"error": str(exc)}})
                with contextlib.suppress(OSError, SourceError):
                    detach(self._sock)
                return
        log.info("in-kernel filter attached", extra={"fields": {
            "pod_cidrs": list(pod_cidrs), "instructions": len(program),
            "share": list(self._share) if self._share else None}})
