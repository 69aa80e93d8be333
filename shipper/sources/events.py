"""The conntrack event source: the event socket's whole life, and nothing else touches it.

:class:`ConntrackSource` sets the conntrack sysctls, subscribes (before the
first dump, so nothing falls between dump and events), attaches and re-attaches
the kernel filter (it follows the filter's pod CIDRs by subscription), receives
and decodes bursts, detects overruns, reads the kernel's drop counter, reports
gaps, runs the resync dump, and at stop drains what the kernel still queued
(with reliable DESTROY, also what it redelivers).

It hands what it reads to its consumer through two callables rather than
yielding: ``handle(event)`` for each decoded event (called from inside the
burst loop, with nothing in between: a generator would add a resume per event
on the hot path) and ``on_gap(since_ns, until_ns, lost, overruns, resync)`` for
each gap notice. The socket primitives (open, dump, sysctls, drop counter) are
in :mod:`shipper.sources.conntrack`.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import struct
import time
from collections.abc import Callable, Iterable
from typing import Any

from shipper.config import ConntrackConfig
from shipper.errors import DecodeError, SourceError
from shipper.filters.cidr import CidrFilter
from shipper.log import LogLimit
from shipper.metrics import Metrics
from shipper.record import FlowEvent
from shipper.sources import bpf, conntrack
from shipper.sources.decode import LayoutDecoder, read_head

# The log lines keep the logger name they always had (operators' alerts match it).
log = logging.getLogger("shipper.pipeline")

DROPS_CHECK_S = 5.0
MAX_BURST = 20000
# Reliable DESTROY at stop: the socket counts as drained once no redelivered DESTROY
# came for this long (the kernel redelivers at its own pace: about 390/s with a tiny
# buffer here, never more than 25 ms apart).
REDELIVERY_QUIET_S = 0.25

Handle = Callable[[FlowEvent], None]
# (since_ns, until_ns, lost events or None if unknown, overruns, resync follows)
OnGap = Callable[[int, int, "int | None", int, bool], None]


def _conntrack_max() -> int | None:
    """``net.netfilter.nf_conntrack_max`` (None if unreadable): the most flows the table holds."""
    try:
        with open("/proc/sys/net/netfilter/nf_conntrack_max") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


class ConntrackSource:
    """The conntrack event socket of one network namespace, from subscribe to stop."""

    def __init__(self, cfg: ConntrackConfig, filt: CidrFilter, metrics: Metrics,
                 on_gap: OnGap, on_handle_error: Callable[[Exception], None]) -> None:
        self.cfg = cfg
        self.filter = filt
        self.metrics = metrics
        self.decoder = LayoutDecoder()
        self._on_gap = on_gap
        self._on_handle_error = on_handle_error
        self.sock: Any = None
        self._buf = bytearray(256 * 1024)
        self._poller: Any = None
        self._gap_since: int | None = None
        self._gap_overruns = 0
        self._last_drops: int | None = None
        self._last_ok_ns = time.time_ns()
        self._drops_checked_ns = self._last_ok_ns
        self._next_drops = 0.0  # the first check: DROPS_CHECK_S after the first burst
        self._resync_at: float | None = None  # monotonic time of the next due resync
        self._last_resync = float("-inf")
        self._log_limit = LogLimit(per_s=60.0)
        self._backlog = False  # the last burst left events queued (read on without a pause)
        # Sharded readers (conntrack.workers): this reader's share (k, n) of the flows,
        # kept by the socket's BPF program and, for dumps, in dump(); None: every flow.
        self.share: tuple[int, int] | None = None

    # ---- start-up -----------------------------------------------------------

    def sysctls(self) -> tuple[bool, int | None]:
        """Read (and with ``set_sysctls`` set) the conntrack sysctls; return whether the
        kernel stamps flow starts, and ``nf_conntrack_max``."""
        ns = self.cfg.netns
        before = conntrack.read_sysctls(ns)
        if self.cfg.set_sysctls:
            want = {k: 1 for k in conntrack.SYSCTLS if before.get(k) != 1}
            if want:
                errors = conntrack.set_sysctls(ns, want)
                for k, err in errors.items():
                    log.error("cannot set sysctl", extra={"fields": {
                        "sysctl": f"net.netfilter.nf_conntrack_{k}", "error": err}})
            after = conntrack.read_sysctls(ns)
        else:
            after = before
        for k, v in after.items():
            if v is not None:
                self.metrics.set("shipper_conntrack_sysctl", v, k)
        log.info("conntrack sysctls", extra={"fields": {
            "netns": ns, "before": before, "now": after}})
        if after.get("events") != 1:
            log.warning("nf_conntrack_events is not 1: flows created while no listener "
                        "existed will never produce a DESTROY event")
        if after.get("acct") != 1:
            log.warning("nf_conntrack_acct is not 1: records carry no byte/packet counts")
        if after.get("timestamp") != 1:
            log.warning("nf_conntrack_timestamp is not 1: flow start/end times are "
                        "approximated by when events were read")
        return after.get("timestamp") == 1, conntrack.in_netns(ns, _conntrack_max)

    def open(self) -> None:
        """Subscribe, and attach the kernel filter that follows the filter's pod CIDRs.
        Raises SourceError if the socket cannot be opened (nothing stays open then)."""
        c = self.cfg
        try:
            self.sock = conntrack.open_event_socket(
                c.netns, list(c.events), c.rcvbuf_bytes, reliable_destroy=c.reliable_destroy)
            if c.kernel_filter:
                self.filter.subscribe(
                    bpf.KernelFilter(self.sock, self.metrics, self.share).apply)
            elif self.share is not None:
                bpf.attach(self.sock, bpf.build_program([], share=self.share))
        except BaseException:
            self.close()
            raise
        self._last_drops = conntrack.socket_drops(c.netns, self.sock)
        self._poller = select.poll()
        self._poller.register(self.sock.fileno(), select.POLLIN)

    def rcvbuf(self) -> int:
        """The socket's receive buffer as the kernel granted it."""
        return conntrack.effective_rcvbuf(self.sock)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()

    def dump(self) -> Iterable[FlowEvent]:
        """The conntrack table as snapshot events, filtered in the kernel where it can be.

        With ``conntrack.kernel_filter`` the kernel skips, before building a
        message, entries the CIDR filter would drop anyway: not source-NATed
        (with ``filter.only_snat``) and, when every pod CIDR is of one family, of
        the other family. The kernel cannot match address ranges in a dump
        (CTA_FILTER compares exact addresses), so the pod-CIDR match stays in
        userspace. With a share (sharded readers) only the share's entries are
        returned, by the socket filter's rule, so each entry is shipped once.
        """
        family, snat_only = self._dump_filter()
        events = conntrack.dump_table(self.cfg.netns, self.decoder,
                                      on_decode_error=self._on_decode_error,
                                      family=family, snat_only=snat_only)
        if self.share is None:
            return events
        k, n = self.share  # the socket's rule (bpf.share_of): each entry in one share
        return (ev for ev in events if (0 if ev.ct_id is None else ev.ct_id % n) == k)

    def dump_chunks(self) -> Iterable[memoryview]:
        """The same dump as :meth:`dump` (the same kernel-side filter), undecoded: each
        read's run of whole messages, for :meth:`decode_chunk` in another process (the
        one-shot dump's workers). Every entry is in exactly one chunk."""
        family, snat_only = self._dump_filter()
        return conntrack.dump_chunks(self.cfg.netns, family=family, snat_only=snat_only)

    def decode_chunk(self, chunk: bytes, out: list[FlowEvent]) -> None:
        """Append the snapshot events of one :meth:`dump_chunks` chunk to ``out``;
        malformed entries are counted and skipped as in :meth:`dump`."""
        self.decoder.decode_dump(chunk, len(chunk), time.time_ns(), out,
                                 self._on_decode_error)

    def _dump_filter(self) -> tuple[int, bool]:
        """The dump request's kernel-side filter: ``(family, snat_only)``."""
        family = socket.AF_UNSPEC
        snat_only = False
        if self.cfg.kernel_filter:
            snat_only = self.filter.only_snat
            fams = {":" in c for c in self.filter.pod_cidrs}
            if fams == {False}:
                family = socket.AF_INET
            elif fams == {True}:
                family = socket.AF_INET6
        return family, snat_only

    # ---- the event path -----------------------------------------------------

    def wait(self, timeout_ms: int) -> None:
        """Sleep until events are queued or ``timeout_ms`` passed; with events, let a
        burst gather: draining many events per wake-up costs far less CPU per event
        than waking for each one."""
        if self._backlog:
            # The last burst stopped at MAX_BURST with events still queued: no pause.
            return
        drain_pause = self.cfg.drain_interval_ms / 1000.0
        if self._poller.poll(timeout_ms) and drain_pause:
            time.sleep(drain_pause)

    def read_burst(self, handle: Handle) -> int:
        """Read what is queued (at most MAX_BURST datagrams), decode it and hand each event
        to ``handle``; return how many datagrams were read."""
        recv_into = self.sock.recv_into
        decode = self.decoder.decode
        first = self.decoder.first  # decode()'s fast path, inlined: see LayoutDecoder.first
        time_ns = time.time_ns
        buf = self._buf
        burst = 0
        while burst < MAX_BURST:
            try:
                n = recv_into(buf)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self._on_overrun()
                    continue
                raise SourceError(f"conntrack socket read failed: {exc.strerror}") from exc
            now = time_ns()
            off = 0
            view = None
            while off < n:
                # A layout reads exactly the message's claimed length: only when that
                # ends inside this datagram (the buffer's rest is an older datagram's).
                try:
                    head = read_head(buf, off)[0]
                    mlen = head & 0xFFFFFFFF
                    layout = first.get(head) if off + mlen <= n else None
                    ev = None if layout is None else layout(buf, off, now)
                except struct.error:  # cut short: decode() below says what is wrong
                    ev = None
                if ev is None:  # no layout proves itself on this message: the checked
                    # path, on this datagram's bytes alone
                    if view is None:
                        view = memoryview(buf)[:n]
                    try:
                        ev, mlen = decode(view, off, now)
                    except DecodeError as exc:
                        self._on_decode_error(exc)
                        break  # the rest of this datagram cannot be trusted
                if ev is not None:
                    try:
                        handle(ev)
                    except Exception as exc:  # one bad event must not stop the node
                        self._on_handle_error(exc)
                off += (mlen + 3) & ~3
            if view is not None:
                view.release()
            burst += 1
        if burst:
            self._last_ok_ns = time_ns()
        self._backlog = burst >= MAX_BURST
        return burst

    def after_burst(self, burst: int, handle_all: Callable[[Iterable[FlowEvent]], int]
                    ) -> None:
        """After each burst: close a gap once the queue drained, run a due resync dump
        through ``handle_all``, and check the drop counter every DROPS_CHECK_S."""
        if self._gap_since is not None and burst < MAX_BURST:
            self.check_drops(force_gap=True)  # queue drained: close the gap
        now_m = time.monotonic()
        if self._resync_at is not None and now_m >= self._resync_at:
            self._resync(handle_all)
        if now_m >= self._next_drops:
            if self._next_drops:
                self.check_drops(force_gap=False)
            self._next_drops = now_m + DROPS_CHECK_S

    # ---- overruns -----------------------------------------------------------

    def _on_overrun(self) -> None:
        self.metrics.inc("shipper_overruns_total")
        self._gap_overruns += 1
        if self._gap_since is None:
            self._gap_since = self._last_ok_ns
            log.error("conntrack event socket overrun: the kernel is dropping events")

    def check_drops(self, force_gap: bool) -> None:
        """Read the socket's drop counter; send a gap notice for new losses."""
        drops = conntrack.socket_drops(self.cfg.netns, self.sock)
        now = time.time_ns()
        checked, self._drops_checked_ns = self._drops_checked_ns, now
        lost: int | None = None
        if drops is not None:
            lost = drops - (self._last_drops or 0)
            self._last_drops = drops
        if not force_gap and not lost:
            return
        # Without an ENOBUFS the losses happened some time since the last check.
        since = self._gap_since if self._gap_since is not None else checked
        if lost:
            self.metrics.inc("shipper_events_lost_total", n=lost)
        resync = self.cfg.resync_on_overrun
        self._on_gap(since, now, lost, self._gap_overruns, resync)
        log.error("events lost", extra={"fields": {
            "lost": lost, "overruns": self._gap_overruns, "resync": resync}})
        self._gap_since = None
        self._gap_overruns = 0
        if resync and self._resync_at is None:
            self._resync_at = max(
                time.monotonic(), self._last_resync + self.cfg.resync_min_interval_s)

    def _resync(self, handle_all: Callable[[Iterable[FlowEvent]], int]) -> None:
        self._resync_at = None
        self._last_resync = time.monotonic()
        try:
            n = handle_all(self.dump())
        except SourceError as exc:
            self.metrics.inc("shipper_errors_total", "source", type(exc).__name__)
            log.error("resync dump failed", extra={"fields": {"error": str(exc)}})
            return
        self.metrics.inc("shipper_resyncs_total")
        log.info("resynced from a table dump", extra={"fields": {"entries": n}})

    def _on_decode_error(self, exc: DecodeError) -> None:
        self.metrics.inc("shipper_decode_errors_total", "malformed")
        if self._log_limit.allow("decode"):
            log.warning("undecodable netlink message skipped (further ones this minute are "
                        "only counted)", extra={"fields": {"error": str(exc)}})

    # ---- stop ---------------------------------------------------------------

    def drain_at_stop(self, handle: Handle, grace_s: float,
                      flush: Callable[[], None]) -> None:
        """On stop, hand on what the kernel already queued for us, then report its drops.

        A stop can come while events wait on the socket: during the initial
        Kubernetes sync wait (nothing has read the socket yet) or between two
        loop iterations. They are read and handed to ``handle`` like any other,
        then ``flush`` (nothing more will come: the consumer lets go of what it
        holds), and the kernel's drop counter is checked one last time, so no
        event queued for us vanishes uncounted. Bounded: at most the socket
        buffer's size in bytes (all that can have been queued when the stop
        came; later events came after it) and ``grace_s``; if time runs out
        first, a gap notice says that events were left unread (count unknown).
        """
        sock = self.sock
        limit = conntrack.effective_rcvbuf(sock)
        deadline = time.monotonic() + grace_s
        since = time.time_ns()
        buf = self._buf
        read = events = 0
        unread = False
        while read < limit:
            if time.monotonic() >= deadline:
                unread = True
                break
            try:
                n = sock.recv_into(buf)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self._on_overrun()
                    continue
                log.error("conntrack socket read failed while draining at stop",
                          extra={"fields": {"error": exc.strerror}})
                break
            read += n
            events += self._handle_datagram(buf, n, handle)
        if isinstance(sock, conntrack.ReliableEventSocket) and not unread:
            got, finished = self._drain_redelivered(sock.destroy, deadline, handle)
            events += got
            unread = not finished
        flush()
        if events:
            log.info("events queued at stop were read and shipped",
                     extra={"fields": {"events": events}})
        self.check_drops(force_gap=self._gap_since is not None)
        if unread:
            self._on_gap(since, time.time_ns(), None, 0, False)
            log.error("stop: events still queued on the socket after draining for half of "
                      "shutdown_grace_s were not read (gap record, count unknown)")

    def _handle_datagram(self, buf: bytearray, n: int, handle: Handle) -> int:
        """Decode one datagram read at stop and hand on its events; return how many."""
        now = time.time_ns()
        events = off = 0
        with memoryview(buf)[:n] as view:  # this datagram's bytes, not the buffer's rest
            while off < n:
                try:
                    ev, mlen = self.decoder.decode(view, off, now)
                except DecodeError as exc:
                    self._on_decode_error(exc)
                    break
                if ev is not None:
                    events += 1
                    try:
                        handle(ev)
                    except Exception as exc:
                        self._on_handle_error(exc)
                off += (mlen + 3) & ~3
        return events

    def _drain_redelivered(self, dsock: Any, deadline: float, handle: Handle
                           ) -> tuple[int, bool]:
        """Reliable DESTROY at stop: read the DESTROYs the kernel still holds for us.

        Those whose delivery failed while we were busy are retried by the kernel at
        its own pace; when our socket closes, the kernel frees them unshipped and
        tells nobody how many there were. So keep reading the DESTROY socket until
        it stays empty for REDELIVERY_QUIET_S, bounded by ``deadline``. Return how
        many events were read and whether it drained (False: the deadline came first).
        """
        poller = select.poll()
        poller.register(dsock.fileno(), select.POLLIN)
        buf = self._buf
        events = 0
        while time.monotonic() < deadline:
            try:
                n = dsock.recv_into(buf)
            except BlockingIOError:
                wait = min(REDELIVERY_QUIET_S, max(0.0, deadline - time.monotonic()))
                if poller.poll(int(wait * 1000)):
                    continue
                return events, True
            except OSError as exc:
                log.error("conntrack DESTROY socket read failed while draining at stop",
                          extra={"fields": {"error": exc.strerror}})
                return events, True
            events += self._handle_datagram(buf, n, handle)
        return events, False
