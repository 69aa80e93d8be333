"""Sharded readers (``conntrack.workers: N``): N reader processes, one shipper.

One Python process tops out at one core. With ``N > 1`` the shipper forks N
reader processes ("workers") at start; worker ``k`` runs the whole event path
of the single-process shipper for its share of the flows, and the main process
("parent") runs everything that must exist once per node::

    kernel ──▶ worker 0: socket (BPF: pod CIDRs + CTA_ID % N == 0) ─ decode ─ filter
          │              ─ attribute ─ [wait] ─ encode ─ batch ──┐ closed batches
          ├──▶ worker 1: ... (CTA_ID % N == 1)  ... ─────────────┤ counter deltas
          ...                                                    ▼ (one pipe each)
    parent: pod sources (state file, pods file, Kubernetes API) ─▶ PodIndex, CidrFilter
            replicated to every worker (index updates, CIDRs, source freshness);
            ONE delivery (queue, spool, retries, sink); metrics, /healthz, /readyz

- **Shares.** Each worker's socket carries a BPF program with the share clause
  (:func:`shipper.sources.bpf.share_of`: ``CTA_ID mod N``; messages without an
  id go to worker 0), so the kernel queues each flow event on exactly one
  worker's socket, and every event of a flow (NEW, UPDATE, DESTROY, its dump
  entry) on the same one: its flow-start cache and resolve wait stay local.
  The initial and resync dumps keep the same share (in userspace). Gap records
  stay exact: each worker reads its own socket's drop counter.
- **Replication** parent -> workers, in the order the parent applied them:
  ``PodIndex.update/delete/reconcile`` calls (with their timestamps, so every
  copy holds the same intervals), ``CidrFilter.set_cidrs`` (each worker's
  KernelFilter re-attaches its program) and the pod sources' freshness
  (``SourceState``, polled every ``STATE_POLL_S``), so the stale hold and the
  resolve wait work in each worker as in one process. A worker's copy lags the
  parent's by a pipe hop; the resolve wait already covers an index that is
  behind the kernel.
- **Workers -> parent**: closed batches (already encoded entries: the parent
  does no per-record work but a pickle load), counter deltas once a second
  (the parent adds them up, so every metric keeps its meaning as a total; plus
  ``shipper_worker_events_total{worker}``) and progress (``/healthz`` fails
  when a worker made no progress for ``health.stall_s``). A full delivery
  queue blocks the parent's reader, the pipe fills, and the worker blocks in
  its send: the same backpressure as in one process.
- **Failure**: a worker that exits unasked (crash, OOM kill, socket error)
  stops the whole agent with exit code 3 after the others drained and
  delivery flushed, with a gap record for its share (count unknown). It is
  not restarted in place: forking again from a parent that now runs threads
  is unsafe, and a DaemonSet pod is restarted by the kubelet, which counts and
  backs off restarts where an operator looks for them; the fresh start dumps
  the table, so live flows of the lost share are shipped again (snapshot).
  Never a silent missing share.
- **Stop** (SIGTERM to the parent): every worker drains its socket (and the
  reliable-DESTROY redeliveries) as one process does, flushes its batch and
  counters, and exits; then the parent flushes delivery. A worker ignores
  SIGINT (a terminal's Ctrl-C reaches the whole group: the parent coordinates).
  One ``shutdown_grace_s`` budget covers both: workers get three quarters at
  most (they drain within half, as one process does), delivery the rest.
- **Logs**: a worker's lines carry ``"worker": k``.
- **The one-shot dump** (``dump --workers N``; :meth:`Shards.dump`,
  :meth:`Worker.dump_main`): the kernel cannot split a dump, so the parent reads
  the table once and sends each read's whole messages, raw, to the next worker
  over a second socketpair (an empty one ends it); the workers decode, filter,
  attribute and encode and send batches back as above. A worker that dies or
  ends without its part fails the dump (exit 3), never a silent exit 0.

Fork happens before any thread exists (the CLI starts the metrics server
after :meth:`Shards.fork`): a child of a threaded process may inherit locks
held by threads that do not exist in it.

The protocol is :class:`multiprocessing.connection.Connection` over a
socketpair (length-prefixed pickles; stdlib): messages are tuples whose first
item names them (:data:`TO_WORKER`, :data:`TO_PARENT`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pickle
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from shipper.enrich.hold import SourceState
from shipper.errors import SourceError
from shipper.memory import tune_malloc
from shipper.metrics import DEFS, Metrics
from shipper.pipeline import Pipeline
from shipper.record import FlowEvent
from shipper.sinks.base import Batch

log = logging.getLogger("shipper.shards")

#: A worker reports (counters, progress) at least this often.
BEAT_S = 1.0
#: How often the parent looks for pod-source freshness changes to replicate.
STATE_POLL_S = 0.05
#: PodIndex methods replayed in every worker (pruning each worker does itself).
REPLICATED = ("update", "delete", "reconcile")
#: Gauges a worker owns: the parent shows their sum over workers.
SUMMED_GAUGES = ("shipper_hold_records",)
COUNTERS = tuple(name for name, d in DEFS.items() if d.kind == "counter")

#: parent -> worker messages.
TO_WORKER = {
    "index": "(name, args): replay PodIndex.<name>(*args)",
    "cidrs": "(args,): CidrFilter.set_cidrs(*args)",
    "states": "(states,): pod sources' freshness, see _state_tuple",
    "go": "(states,): the first pod sync is done: dump, then read events",
    "stop": "(): drain and exit",
}
#: worker -> parent messages.
TO_PARENT = {
    "subscribed": "(): the event socket is open",
    "dumped": "(entries,): the initial dump (one-shot dump: this worker's part) is done",
    "cut": "(): one-shot dump: the parent ended the dump before this worker's part was done",
    "running": "(): in the event loop",
    "batch": "(Batch,): a closed batch of encoded entries",
    "counts": "(counters, gauges): counter deltas {name: {labels: n}}, owned gauges",
    "beat": "(): progress",
    "error": "(text,): the worker cannot go on (it exits with code 3)",
    "done": "(): drained and flushed; nothing more will come",
}

StateTuple = tuple[str, bool, "int | None", "int | None", str, int]


def _state_tuple(st: SourceState) -> StateTuple:
    return (st.name, st.stale, st.stale_since_ns, st.recovered_ns, st.reason, st.recoveries)


def _die_with_parent() -> None:
    """Ask the kernel to kill this process when its parent dies (PR_SET_PDEATHSIG):
    an orphaned worker could only read and throw away."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


class _WorkerField(logging.Filter):
    """Adds ``"worker": k`` to every log line of a worker process."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def filter(self, record: logging.LogRecord) -> bool:
        fields = getattr(record, "fields", None)
        record.fields = {**fields, "worker": self.k} if isinstance(fields, dict) else {
            "worker": self.k}
        return True


# ------------------------------------------------------------------- worker
class Worker:
    """One reader process's side: runs ``pipeline``'s event path for share ``k`` of ``n``.

    Built in the forked child from the parent's (not yet started) pipeline:
    the child has a copy of the pod index as loaded from the state file, and
    keeps it in step from the parent's messages.
    """

    def __init__(self, pipeline: Pipeline, k: int, n: int, conn: Connection,
                 sysctls: tuple[bool, int | None], data: Connection | None = None) -> None:
        self.p = pipeline
        self.k, self.n = k, n
        self.conn = conn
        self.data = data  # the one-shot dump's chunks from the parent (dump_main)
        self.sysctls = sysctls
        self.stop = threading.Event()
        self.parent_stop = False  # the stop came from the parent ("stop"), not a signal
        self.go = threading.Event()
        self.error: str | None = None
        self._mirrors: dict[str, SourceState] = {}
        self._next_beat = 0.0
        m = pipeline.metrics
        # Counters start from what the parent had counted before the fork.
        self._sent: dict[tuple[str, tuple[str, ...]], float] = {
            (name, labels): v for name in COUNTERS for labels, v in m.values[name].items()}

    # ---- protocol ---------------------------------------------------------

    def send(self, msg: tuple[Any, ...]) -> None:
        """Send one message to the parent (blocks while the pipe is full: backpressure)."""
        self.conn.send(msg)

    def _send_batch(self, b: Batch) -> None:
        self.send(("batch", b))

    def _beat(self) -> None:
        self._health_beat()
        now = time.monotonic()
        if now >= self._next_beat:
            self._next_beat = now + BEAT_S
            self.send(("beat",))

    def _housekeeping(self) -> None:
        self._pipeline_housekeeping()
        self.send_counts()

    def send_counts(self) -> None:
        """Counter deltas since the last report, and the gauges a worker owns."""
        m = self.p.metrics
        deltas: dict[str, dict[tuple[str, ...], float]] = {}
        sent = self._sent
        for name in COUNTERS:
            for labels, v in m.values[name].items():
                d = v - sent.get((name, labels), 0.0)
                if d:
                    deltas.setdefault(name, {})[labels] = d
                    sent[(name, labels)] = v
        gauges = {name: m.value(name) for name in SUMMED_GAUGES}
        self.send(("counts", deltas, gauges))

    def _control(self) -> None:
        """The control thread: apply the parent's messages until ``stop`` or EOF."""
        p = self.p
        try:
            while True:
                msg = self.conn.recv()
                kind = msg[0]
                if kind == "index":
                    getattr(p.index, msg[1])(*msg[2])
                elif kind == "cidrs":
                    try:
                        p.filter.set_cidrs(*msg[1])
                    except SourceError as exc:  # the share could not be kept
                        self.error = str(exc)
                        self.stop.set()
                elif kind in ("states", "go"):
                    self._apply_states(msg[1])
                    if kind == "go":
                        self.go.set()
                elif kind == "stop":
                    self.parent_stop = True
                    self.stop.set()
        except (EOFError, OSError):
            self.stop.set()  # the parent is gone, or closed our pipe

    def _apply_states(self, states: list[StateTuple]) -> None:
        for name, stale, since, recovered, reason, recoveries in states:
            st = self._mirrors.get(name)
            if st is None:
                st = self._mirrors[name] = SourceState(name)
                self.p.wait.states.append(st)
            st.stale_since_ns, st.recovered_ns = since, recovered
            st.reason, st.recoveries = reason, recoveries
            st.stale = stale  # last: the event loop reads this flag

    # ---- run ----------------------------------------------------------------

    def _start(self) -> None:
        """What every worker does first: its log field and signals, the pipeline's
        output, health and housekeeping routed to the parent, the control thread."""
        for handler in logging.getLogger("shipper").handlers:
            handler.addFilter(_WorkerField(self.k))
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda _s, _f: self.stop.set())
        _die_with_parent()
        p = self.p
        p.out.stop = self.stop
        p.out.submit = self._send_batch  # type: ignore[method-assign]
        self._health_beat = p.health.beat
        p.health.beat = self._beat  # type: ignore[method-assign]
        self._pipeline_housekeeping = p._housekeeping
        p._housekeeping = self._housekeeping  # type: ignore[method-assign]
        threading.Thread(target=self._control, name="shard-control", daemon=True).start()

    def _flush(self) -> None:
        """Hand on the resolve wait's records, the counters and the open batch (also
        when the worker crashes)."""
        p = self.p
        p.wait.flush()
        p._flush_counters()
        self.send_counts()
        b = p.out.batcher.flush()
        if b is not None:
            self.send(("batch", b))

    def _finish(self, code: int) -> int:
        """After :meth:`_flush`: report an error, say done; return the exit code."""
        if self.error is not None:
            log.error("reader failed", extra={"fields": {"worker": self.k, "error": self.error}})
            self.send(("error", self.error))
            code = 3
        self.send(("done",))
        self.conn.close()
        return code

    def main(self) -> int:
        """Run the worker until the parent says stop; return the exit code."""
        self._start()
        p, cfg = self.p, self.p.cfg
        src = p.source
        src.share = (self.k, self.n)
        code = 0
        try:
            p.starts.size(*self.sysctls)
            src.open()
            self.send(("subscribed",))
            while not self.go.wait(0.2) and not self.stop.is_set():
                self._beat()
            if not self.stop.is_set():
                p.wait.tick(time.time_ns(), time.monotonic())
                n = p.handle_all(src.dump()) if cfg.conntrack.dump_at_start else 0
                self.send(("dumped", n))
                self.send(("running",))
                p._loop(self.stop)
            p._drain_at_stop()
        except SourceError as exc:
            self.error = str(exc)
        finally:
            src.close()
            self._flush()
        return self._finish(code)

    def dump_main(self) -> int:
        """The one-shot dump's worker: filter, attribute and encode the entries of the
        chunks the parent sends (whole dump reads, round robin) until an empty one;
        return the exit code. No socket of its own and no flow-start cache (no later
        event of these flows comes)."""
        self._start()
        p = self.p
        assert self.data is not None
        p.starts.max_entries = 0
        entries = 0
        try:
            while not self.go.wait(0.2) and not self.stop.is_set():
                self._beat()
            if not self.stop.is_set():
                p.wait.tick(time.time_ns(), time.monotonic())
                events: list[FlowEvent] = []
                decode, handle, recv = p.source.decode_chunk, p.handle, self.data.recv_bytes
                while chunk := recv():
                    decode(chunk, events)
                    for ev in events:
                        handle(ev)
                    entries += len(events)
                    events.clear()
                    self._beat()
                self.send(("dumped", entries))
            elif self.parent_stop:  # the parent ended the dump before it began here
                self.send(("cut",))
        except EOFError:  # the parent ended the dump early, after a failure it reports
            self.send(("cut",))  # (had it died, so would we)
        except OSError as exc:
            self.error = f"the dump's chunks could not be read: {exc}"
        finally:
            self.data.close()
            self._flush()
        return self._finish(0)


# ------------------------------------------------------------------- parent
@dataclass
class _Handle:
    """The parent's view of one worker."""

    k: int
    pid: int
    conn: Connection
    heard: float = field(default_factory=time.monotonic)
    heard_ns: int = field(default_factory=time.time_ns)
    subscribed: bool = False
    dumped: bool = False
    running: bool = False
    done: bool = False
    gone: bool = False  # its pipe closed
    error: str | None = None
    entries: int = 0  # its dump's entries ("dumped")
    cut: bool = False  # one-shot dump: the parent ended it before its part was done
    data: Connection | None = None  # the one-shot dump's chunks to it
    gauges: dict[str, float] = field(default_factory=dict)
    thread: threading.Thread | None = None


class Shards:
    """The parent of N reader processes: build with a pipeline, :meth:`fork`, :meth:`run`."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.p = pipeline
        self.n = pipeline.cfg.conntrack.workers
        self.workers: list[_Handle] = []
        self._sysctls: tuple[bool, int | None] = (False, None)
        self._repl_lock = threading.Lock()  # replication order = application order
        self._out_lock = threading.Lock()  # the parent's RecordOutput and health.blocked
        self._fold_lock = threading.Lock()
        self._seq = 0
        self.failure: str | None = None
        self.stop: threading.Event | None = None
        self.one_shot = False  # fork(one_shot=True): the workers of a one-shot dump

    # ---- start --------------------------------------------------------------

    def fork(self, child_main: Callable[[Worker], int] | None = None, *,
             one_shot: bool = False) -> None:
        """Load the pod history, set the sysctls (not for a one-shot dump), and fork
        the workers (each opens its own socket). Call before any thread exists.
        ``child_main`` (tests) replaces :meth:`Worker.main` in the children. With
        ``one_shot`` the workers are those of :meth:`dump` (:meth:`Worker.dump_main`,
        each with a second pipe for the dump's chunks)."""
        p = self.p
        self.one_shot = one_shot
        tune_malloc()
        p.pods.load_state()  # every worker starts with the history
        # A one-shot dump reads the table as it is, as the one-process dump does: it
        # neither sets the conntrack sysctls nor sizes a flow-start cache by them.
        self._sysctls = (False, None) if one_shot else p.source.sysctls()
        for k in range(self.n):
            ours, theirs = socket.socketpair()
            data_ours, data_theirs = socket.socketpair() if one_shot else (None, None)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # the worker
                code = 1
                try:
                    ours.close()
                    if data_ours is not None:
                        data_ours.close()
                    for h in self.workers:
                        h.conn.close()
                        if h.data is not None:
                            h.data.close()
                    data = None if data_theirs is None else Connection(data_theirs.detach())
                    w = Worker(p, k, self.n, Connection(theirs.detach()), self._sysctls, data)
                    code = (child_main or (Worker.dump_main if one_shot else Worker.main))(w)
                except BaseException:
                    log.exception("reader crashed", extra={"fields": {"worker": k}})
                finally:
                    with contextlib.suppress(Exception):
                        sys.stdout.flush()
                        sys.stderr.flush()
                    os._exit(code)
            theirs.close()
            h = _Handle(k, pid, Connection(ours.detach()))
            if data_ours is not None and data_theirs is not None:
                data_theirs.close()
                h.data = Connection(data_ours.detach())
            self.workers.append(h)
            log.info("reader started", extra={"fields": {"worker": k, "pid": pid}})

    def _hook_replication(self) -> None:
        """From now on every change the pod sources make is replayed in the workers."""
        index, filt, lock = self.p.index, self.p.filter, self._repl_lock

        def replicated(name: str, orig: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any) -> Any:
                if name == "reconcile":
                    args = (list(args[0]), *args[1:])  # may be a one-shot iterable
                with lock:
                    result = orig(*args)
                    self.broadcast(("index", name, args))
                return result
            return call

        for name in REPLICATED:
            setattr(index, name, replicated(name, getattr(index, name)))
        set_cidrs = filt.set_cidrs

        def set_cidrs_replicated(*args: Any) -> None:
            with lock:
                set_cidrs(*args)  # ConfigError: nothing changed, nothing sent
                self.broadcast(("cidrs", args))

        filt.set_cidrs = set_cidrs_replicated  # type: ignore[method-assign,assignment]

    def broadcast(self, msg: tuple[Any, ...]) -> None:
        """Send ``msg`` to every worker still there (pickled once)."""
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        for h in self.workers:
            if not h.gone:
                try:
                    h.conn.send_bytes(data)
                except OSError:
                    h.gone = True  # its reader thread reports why

    # ---- the parent's loop ------------------------------------------------------

    def run(self, stop: threading.Event) -> int:
        """Run until ``stop``; stop the workers, flush delivery; return an exit code
        (0 clean, 1 undelivered records). Raises SourceError when a worker failed
        or exited unasked (after the rest was shut down cleanly)."""
        p = self.p
        self._start(stop)
        clean = False
        try:
            p.pods.start(p.wait.states, stop)
            states = [_state_tuple(st) for st in p.wait.states]
            self.broadcast(("go", states))
            self._loop(stop, states)
        finally:
            clean = self._stop()
        if self.failure is not None:
            raise SourceError(self.failure)
        return 0 if clean else 1

    def dump(self) -> int:
        """The one-shot dump over the workers forked with ``one_shot``: this process
        reads the table (:meth:`ConntrackSource.dump_chunks`: the kernel's dump work and
        a walk over the netlink headers) and hands each read's run of whole messages to
        the next worker, round robin; the workers filter, attribute and encode their
        entries and send batches back, delivered here. Every entry is in exactly one
        chunk, so shipped once. Return 0 (everything delivered) or 1; raise
        SourceError if the dump or a worker failed (after the rest was shut down)."""
        p = self.p
        stop = threading.Event()
        self._start(stop)  # the pod history was loaded before the fork
        clean = completed = False
        try:
            p.pods.start(p.wait.states, stop, save=False)  # the daemon owns the state file
            states = [_state_tuple(st) for st in p.wait.states]
            self.broadcast(("go", states))
            threading.Thread(target=self._feed, args=(stop,), name="dump-feed",
                             daemon=True).start()
            self._loop(stop, states)  # until every worker is done, or a failure
            completed = True
        finally:
            if not completed:  # interrupted (Ctrl-C): the workers' parts are not done
                self.failure = self.failure or "the dump was interrupted"
            stop.set()
            self.broadcast(("stop",))
            for h in self.workers:  # a worker still waiting for chunks: the dump is over
                if h.data is not None:
                    with contextlib.suppress(OSError):
                        h.data.close()
            clean = self._stop()
        if self.failure is not None:
            raise SourceError(self.failure)
        log.info("table dumped", extra={"fields": {
            "entries": sum(h.entries for h in self.workers), "workers": self.n}})
        return 0 if clean else 1

    def _feed(self, stop: threading.Event) -> None:
        """The one-shot dump's reads, to the workers in turn; then an empty chunk each."""
        workers, k = self.workers, 0
        try:
            for chunk in self.p.source.dump_chunks():
                if stop.is_set():
                    return
                if chunk:
                    data = workers[k].data
                    assert data is not None
                    data.send_bytes(chunk)  # blocks while the worker is behind: the
                    k = (k + 1) % len(workers)  # kernel's dump waits for us meanwhile
            for h in workers:
                assert h.data is not None
                h.data.send_bytes(b"")
        except SourceError as exc:
            self.failure = self.failure or str(exc)
            log.error("conntrack dump failed", extra={"fields": {"error": str(exc)}})
            stop.set()
        except OSError:
            stop.set()  # a worker's pipe closed: its reader thread says why
        except BaseException as exc:  # never a dump left waiting for a dead feeder
            self.failure = self.failure or f"the dump's reader failed: {exc!r}"
            log.exception("the dump's reader failed")
            stop.set()

    def _start(self, stop: threading.Event) -> None:
        """Start delivery and one thread reading each worker's messages."""
        p, cfg = self.p, self.p.cfg
        self.stop = stop
        p.out.stop = stop
        self._hook_replication()
        try:
            p.delivery.start()
        except BaseException:
            self._stop_workers(cfg.shutdown_grace_s)
            raise
        for h in self.workers:
            h.thread = threading.Thread(target=self._read, args=(h,), name=f"shard-{h.k}",
                                        daemon=True)
            h.thread.start()

    def _stop(self) -> bool:
        """Stop the workers and flush delivery, within one ``shutdown_grace_s`` budget:
        the workers drain within half of it (as one process does), delivery gets what
        is left, at least a quarter. True if everything was delivered."""
        grace = self.p.cfg.shutdown_grace_s
        t0 = time.monotonic()
        self._stop_workers(grace * 0.75)
        with self._out_lock:
            return self.p._shutdown(max(grace * 0.25, grace - (time.monotonic() - t0)))

    def _loop(self, stop: threading.Event, states: list[StateTuple]) -> None:
        p = self.p
        health, monotonic = p.health, time.monotonic
        next_house = monotonic() + 1.0
        next_prune = monotonic() + 60.0
        while not stop.wait(STATE_POLL_S):
            now = monotonic()
            now_states = [_state_tuple(st) for st in p.wait.states]
            if now_states != states:
                states = now_states
                self.broadcast(("states", states))
            if all(now - h.heard <= health.stall_s for h in self.workers):
                health.beat()  # progress only while every worker makes progress
            with self._out_lock:
                p.out.due(now)
            if now >= next_house:
                next_house = now + 1.0
                p.wait.tick(time.time_ns(), now)  # the pods-stale gauge and /readyz
                with self._fold_lock:
                    p._housekeeping()
                    for name in SUMMED_GAUGES:
                        p.metrics.set(name, sum(h.gauges.get(name, 0.0) for h in self.workers))
                if now >= next_prune:
                    next_prune = now + 60.0
                    p.index.prune(time.time_ns())

    def _read(self, h: _Handle) -> None:
        """One worker's messages, until its pipe closes."""
        p, m = self.p, self.p.metrics
        try:
            while True:
                msg = h.conn.recv()
                h.heard = time.monotonic()
                h.heard_ns = time.time_ns()
                kind = msg[0]
                if kind == "batch":
                    b: Batch = msg[1]
                    with self._out_lock:
                        self._seq += 1
                        b.seq = self._seq  # one numbering across workers (the spool's)
                        p.out.submit(b)
                elif kind == "counts":
                    self._fold(h, m, msg[1], msg[2])
                elif kind == "beat":
                    pass
                elif kind == "subscribed":
                    h.subscribed = True
                    self._ready("subscribed", lambda x: x.subscribed)
                elif kind == "dumped":
                    h.dumped, h.entries = True, msg[1]
                    log.info("table dumped" if self.one_shot else "initial table dump",
                             extra={"fields": {"worker": h.k, "entries": msg[1]}})
                    self._ready("initial_dump", lambda x: x.dumped)
                elif kind == "cut":
                    h.cut = True
                elif kind == "running":
                    h.running = True
                    self._ready("running", lambda x: x.running)
                elif kind == "error":
                    h.error = msg[1]
                elif kind == "done":
                    h.done = True
                    if self.one_shot and self.stop is not None and all(
                            x.done for x in self.workers):
                        self.stop.set()  # the dump is over: every worker flushed
        except (EOFError, OSError):
            pass
        h.gone = True
        if self.one_shot:
            # A dump worker is done when it did its part, or when this process cut the
            # dump short (after a failure that fails it); a worker that ended without its
            # part on its own lost entries: a failure, with a gap record below.
            if h.done and h.error is None and (h.dumped or h.cut):
                return
        elif h.done and h.error is None and self.stop is not None and self.stop.is_set():
            return
        # Exited unasked, or failed: the agent stops (module docstring, "Failure").
        why = h.error or ("ended before its part of the dump was done" if h.done
                          else "exited unexpectedly")
        self.failure = self.failure or f"reader {h.k} (pid {h.pid}): {why}"
        m.inc("shipper_errors_total", "worker", "failed" if h.error else "exited")
        log.error("reader failed: stopping the shipper (a restart re-dumps the table)",
                  extra={"fields": {"worker": h.k, "pid": h.pid, "error": why}})
        if not h.done or (self.one_shot and not (h.dumped or h.cut)):
            with self._out_lock:  # its share is missing from its last sign of life
                p.out.gap(h.heard_ns, time.time_ns(), None, 0, False)
        if self.stop is not None:
            self.stop.set()

    def _fold(self, h: _Handle, m: Metrics, deltas: dict[str, dict[tuple[str, ...], float]],
              gauges: dict[str, float]) -> None:
        with self._fold_lock:
            for name, by_labels in deltas.items():
                for labels, d in by_labels.items():
                    m.inc(name, *labels, n=d)
            events = sum(deltas.get("shipper_events_total", {}).values())
            if events:
                m.inc("shipper_worker_events_total", str(h.k), n=events)
            h.gauges = gauges

    def _ready(self, name: str, cond: Callable[[_Handle], bool]) -> None:
        done = sum(1 for h in self.workers if cond(h))
        self.p.health.set_ready(name, done == self.n, f"{done} of {self.n} readers")

    # ---- stop ---------------------------------------------------------------

    def _stop_workers(self, grace_s: float) -> None:
        """Tell every worker to stop and wait (bounded) until each drained, flushed and
        exited; kill those that did not within ``grace_s``."""
        self.broadcast(("stop",))
        deadline = time.monotonic() + grace_s
        for h in self.workers:
            if h.thread is not None:
                h.thread.join(max(0.0, deadline - time.monotonic()))
        for h in self.workers:
            if (h.thread is not None and h.thread.is_alive()) or not _reaped(
                    h.pid, max(deadline, time.monotonic() + 1.0)):
                log.error("reader did not stop within the grace period; killed",
                          extra={"fields": {"worker": h.k, "pid": h.pid}})
                self.p.metrics.inc("shipper_errors_total", "worker", "stop_timeout")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(h.pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(h.pid, 0)
            with contextlib.suppress(OSError):
                h.conn.close()

    def pids(self) -> Iterator[int]:
        """The workers' process ids."""
        return (h.pid for h in self.workers)


def _reaped(pid: int, deadline: float) -> bool:
    """Wait (bounded) for child ``pid`` to exit and reap it; True if it did."""
    while True:
        try:
            done, _status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return True
        if done:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
