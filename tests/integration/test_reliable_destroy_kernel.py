"""Reliable DESTROY (``conntrack.reliable_destroy``) on the real kernel.

What these tests establish on this kernel (6.18, where
``nf_conntrack_events_retry_timeout`` no longer exists), with a receive buffer
that holds only a handful of events and a reader that pauses while the flows
of a lab end (``conntrack -D`` in the lab's gateway namespace):

* Without the option the kernel drops every DESTROY that does not fit, at
  once and for good; the entries leave the table immediately. The socket's
  drop counter counts exactly the DESTROYs that never came.
* With it (NETLINK_BROADCAST_ERROR + NETLINK_NO_ENOBUFS on the DESTROY
  socket) nothing is lost: the deleted entries stay in the table (they still
  count against nf_conntrack_max) while we do not read, the kernel keeps
  retrying them for as long as the reader pauses (about 50 failed attempts a
  second; 30 s tried by hand, 3 s here), and every DESTROY arrives, once,
  within seconds after reading resumes (about 0.8 s for 300 here). No
  ENOBUFS is ever reported on that socket, and its drop
  counter grows with every failed *attempt*, far beyond the number of
  DESTROYs: it is not a loss count, which is why DESTROY gets its own socket
  and the gap accounting reads only the NEW/UPDATE socket.

Every lab, socket and shipper process is removed also when a test fails.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shipper.lab import Lab
from shipper.sources import conntrack
from shipper.sources.decode import LayoutDecoder
from tests.integration.harness import Record, ShipperProcess, ct_delete, get

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

FLOWS = 300
SMALL_BUF = 4096  # the kernel doubles it: room for about six events
PAUSE_S = 3.0  # the reader pauses this long after the flows ended


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(pods=1, ipv6=False) as built:
        built.set_sysctl(built.gw, "net.netfilter.nf_conntrack_events", 1)
        # Long enough that no entry times out by itself during a test.
        built.set_sysctl(built.gw, "net.netfilter.nf_conntrack_udp_timeout", 120)
        yield built


def _table_size(lab: Lab) -> int:
    return int(lab.run(lab.gw, "conntrack", "-C").stdout.strip())


def _make_flows(lab: Lab) -> None:
    """FLOWS new UDP flows pod -> ext (one per datagram), all in the table."""
    res = lab.udp_flood(0, 3000, FLOWS / 3000 + 0.5, max_count=FLOWS)
    assert res.sent == FLOWS
    deadline = time.monotonic() + 10
    while _table_size(lab) < FLOWS and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _table_size(lab) >= FLOWS


def _read_all(sock: socket.socket | conntrack.ReliableEventSocket,
              quiet_s: float = 2.0, limit_s: float = 30.0,
              ) -> tuple[dict[str, set[int]], list[float], int]:
    """Read until nothing came for ``quiet_s``: ct ids by action, DESTROY arrival times
    (seconds after the first read), ENOBUFS errors seen."""
    dec = LayoutDecoder()
    buf = bytearray(1 << 16)
    seen: dict[str, set[int]] = {}
    times: list[float] = []
    enobufs = 0
    t0 = last = time.monotonic()
    while time.monotonic() - last < quiet_s and time.monotonic() - t0 < limit_s:
        try:
            n = sock.recv_into(buf)
        except BlockingIOError:
            time.sleep(0.005)
            continue
        except OSError as exc:
            assert exc.errno == errno.ENOBUFS, exc
            enobufs += 1
            continue
        last = time.monotonic()
        off = 0
        while off < n:
            ev, mlen = dec.decode(buf, off, 0)
            if ev is not None and ev.proto == 17:  # the lab's flows, not the gw's IGMP
                seen.setdefault(ev.action, set()).add(ev.ct_id or 0)
                if ev.action == "destroy":
                    times.append(last - t0)
            off += (mlen + 3) & ~3
    return seen, times, enobufs


class TestKernelBehaviour:
    """What the kernel does with DESTROYs that do not fit, with and without the option."""

    def test_without_option_destroys_that_do_not_fit_are_lost_and_counted(self, lab: Lab
                                                                          ) -> None:
        """Ordinary socket: DESTROYs beyond the buffer are dropped at once, the entries are
        gone from the table, and the drop counter equals the DESTROYs that never came."""
        sock = conntrack.open_event_socket(lab.gw, ["destroy"], SMALL_BUF)
        try:
            _make_flows(lab)
            drops0 = conntrack.socket_drops(lab.gw, sock)
            assert drops0 is not None
            ct_delete(lab, "-p", "udp")
            assert _table_size(lab) < 5  # freed at once although we did not read
            time.sleep(PAUSE_S)
            seen, _times, enobufs = _read_all(sock)
            got = len(seen.get("destroy", set()))
            drops = conntrack.socket_drops(lab.gw, sock)
            assert drops is not None
            assert got < FLOWS // 10, got  # only what fitted into the small buffer
            assert got + (drops - drops0) == FLOWS  # every loss counted, exactly
            assert enobufs == 1  # one ENOBUFS for the whole burst of losses
        finally:
            sock.close()

    def test_with_option_every_destroy_is_redelivered_after_the_pause(self, lab: Lab) -> None:
        """Reliable DESTROY: the dead entries stay in the table while we pause, every
        DESTROY arrives after reading resumes (within a few seconds), no ENOBUFS, and the
        DESTROY socket's drop counter counts retried attempts, not losses."""
        sock = conntrack.open_event_socket(lab.gw, ["destroy"], SMALL_BUF,
                                           reliable_destroy=True)
        try:
            assert isinstance(sock, conntrack.ReliableEventSocket)
            _make_flows(lab)
            created = {int(line.split("id=")[1].split()[0])
                       for line in lab.run(lab.gw, "conntrack", "-L", "-p", "udp", "-o", "id"
                                           ).stdout.splitlines() if "id=" in line}
            assert len(created) >= FLOWS
            ct_delete(lab, "-p", "udp")
            # The price: deleted, yet still allocated and counted in the table.
            assert _table_size(lab) >= FLOWS - 10
            time.sleep(PAUSE_S)
            assert _table_size(lab) >= FLOWS - 10  # still there after the pause
            retries = conntrack.destroy_retries(lab.gw, sock)
            seen, times, enobufs = _read_all(sock)
            destroyed = seen.get("destroy", set())
            assert destroyed == created  # every single one...
            assert len(times) == FLOWS  # ...and each once
            assert enobufs == 0
            assert max(times) < 5.0, max(times)  # all within seconds after resuming
            assert _table_size(lab) < 5  # freed once delivered
            # Failed attempts: many more than the DESTROYs that did not fit at first.
            assert retries is not None and retries > FLOWS
            assert conntrack.socket_drops(lab.gw, sock) == 0  # the NEW/UPDATE socket lost none
        finally:
            sock.close()

    def test_with_option_new_losses_stay_exactly_counted(self, lab: Lab) -> None:
        """With NEW and DESTROY subscribed and reliable DESTROY, NEWs that do not fit are
        lost (the kernel never retries them) and the NEW socket's drop counter counts
        exactly those, while every DESTROY still arrives."""
        sock = conntrack.open_event_socket(lab.gw, ["new", "destroy"], SMALL_BUF,
                                           reliable_destroy=True)
        try:
            drops0 = conntrack.socket_drops(lab.gw, sock)
            assert drops0 == 0
            _make_flows(lab)
            ct_delete(lab, "-p", "udp")
            time.sleep(PAUSE_S)
            seen, _times, _enobufs = _read_all(sock)
            news = len(seen.get("new", set()))
            drops = conntrack.socket_drops(lab.gw, sock)
            assert drops is not None
            assert news < FLOWS // 10
            # Exact: the gap records stay right. The gateway's own multicast join can add
            # one IGMP entry (and its NEW) at any moment; it is the only non-UDP entry.
            others = _table_size(lab)
            assert FLOWS <= news + drops <= FLOWS + others, (news, drops, others)
            assert len(seen.get("destroy", set())) == FLOWS
        finally:
            sock.close()


class TestShipper:
    """The shipper with ``conntrack.reliable_destroy: true``, paused by SIGSTOP."""

    @pytest.fixture
    def shipper(self, lab: Lab, tmp_path: Path) -> Iterator[ShipperProcess]:
        sp = ShipperProcess(lab, tmp_path, config={
            "conntrack.events": ["new", "destroy"],
            "conntrack.rcvbuf_bytes": SMALL_BUF,
            "conntrack.reliable_destroy": True,
            "conntrack.resync_on_overrun": False,
            "health.stall_s": 60,
        })
        try:
            yield sp
        finally:
            if sp.proc.poll() is None:
                os.kill(sp.proc.pid, signal.SIGCONT)
            sp.stop()

    def test_stalled_shipper_ships_every_destroy_and_counts_lost_news_exactly(
            self, lab: Lab, shipper: ShipperProcess) -> None:
        """A shipper stopped while 300 flows start and are deleted: after it resumes, it
        ships a DESTROY record for every flow, and its gap records' lost_events equal the
        NEW records that are missing."""
        shipper.wait_ready()
        os.kill(shipper.proc.pid, signal.SIGSTOP)
        try:
            _make_flows(lab)
            ct_delete(lab, "-p", "udp")
            time.sleep(PAUSE_S)
            assert _table_size(lab) >= FLOWS - 10  # kept for the stalled reader
        finally:
            os.kill(shipper.proc.pid, signal.SIGCONT)

        def udp(action: str) -> Callable[[Record], bool]:
            return lambda r: (get(r, "event.action") == action
                              and get(r, "network.transport") == "udp")

        destroys = shipper.wait_records(udp("destroy"), n=FLOWS, timeout=30)
        assert len({get(r, "destination.port") for r in destroys}) == FLOWS
        gaps: list[Record] = shipper.wait_records(
            lambda r: get(r, "event.action") == "gap", n=1, timeout=15)
        news = len([r for r in shipper.records() if udp("new")(r)])
        lost = sum(get(g, "flowlog.gap.lost_events") or 0 for g in gaps)
        assert news < FLOWS
        # The gw's IGMP join (the one non-UDP entry) may add one lost NEW.
        assert FLOWS <= news + lost <= FLOWS + _table_size(lab), (news, lost)

    def test_stop_during_redelivery_ships_every_destroy(
            self, lab: Lab, shipper: ShipperProcess) -> None:
        """SIGTERM right after a stall, while the kernel still holds most DESTROYs for
        redelivery: the stop drain keeps reading them until the socket stays quiet, so
        every flow's DESTROY is shipped before the shipper exits (closing the socket would
        make the kernel free them unshipped and uncounted)."""
        shipper.wait_ready()
        os.kill(shipper.proc.pid, signal.SIGSTOP)
        try:
            _make_flows(lab)
            ct_delete(lab, "-p", "udp")
            time.sleep(PAUSE_S)
            held = _table_size(lab)
            assert held >= FLOWS - 10
        finally:
            os.kill(shipper.proc.pid, signal.SIGCONT)
        os.kill(shipper.proc.pid, signal.SIGTERM)
        assert shipper.stop() == 0
        destroys = [r for r in shipper.records() if get(r, "event.action") == "destroy"
                    and get(r, "network.transport") == "udp"]
        assert len({get(r, "destination.port") for r in destroys}) == FLOWS
        assert _table_size(lab) < 5  # nothing left held for a closed socket
