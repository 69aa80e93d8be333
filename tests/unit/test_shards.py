"""shipper.shards: the parent/worker protocol of sharded readers, without root.

In-process tests join a parent (:class:`Shards`) and a :class:`Worker` by a
socketpair; the last test forks real workers whose event socket is replaced by
captured kernel messages, each worker keeping its share by running the real
BPF share program on them.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson
import pytest

from shipper.config import Config
from shipper.enrich.hold import SourceState
from shipper.errors import SourceError
from shipper.metrics import Metrics
from shipper.pipeline import Pipeline
from shipper.record import ACTION_NEW, FlowEvent, PodMeta
from shipper.shards import Shards, Worker, _Handle
from shipper.sinks.base import Batch, EntryFormat
from shipper.sources import bpf
from shipper.sources.decode import NLMSG_DONE, LayoutDecoder, decode_generic

S = 1_000_000_000
T0 = 1_795_766_503 * S
POD = int(ipaddress.ip_address("10.16.0.5"))
REMOTE = int(ipaddress.ip_address("93.184.216.34"))
NODE = int(ipaddress.ip_address("192.168.1.10"))
DATA = Path(__file__).resolve().parents[1] / "data" / "ctnetlink_messages.json"
MESSAGES = [bytes.fromhex(m["hex"]) for m in json.loads(DATA.read_text())]


class RecordingSink:
    """A sink that keeps every delivered entry (delivery always succeeds)."""

    acknowledged = False
    entry_format: EntryFormat = "ndjson"
    name = "recording"

    def __init__(self) -> None:
        self.entries: list[bytes] = []
        self.seqs: list[int] = []

    def encode(self, record: dict[str, Any], time_ns: int) -> bytes:
        return orjson.dumps(record) + b"\n"

    def deliver(self, batch: Batch) -> None:
        self.entries.extend(batch.entries)
        self.seqs.append(batch.seq)

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


def config(**conntrack: Any) -> Config:
    return Config(filter={"pod_cidrs": ["10.16.0.0/16"]},
                  enrich={"resolve_wait_s": 0},
                  conntrack={"set_sysctls": False, "dump_at_start": False, **conntrack},
                  batch={"max_age_s": 0.05}, shutdown_grace_s=5)


def flow(sport: int) -> FlowEvent:
    return FlowEvent(
        ACTION_NEW, 4, 6, POD, REMOTE, sport, 443, REMOTE, NODE, 443, 61000 + sport % 1000,
        None, None, None, sport, None, None, None, None, None, None, None, None, None,
        T0 + S, None, None, T0 + 100 * S,
    )


def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


class Pair:
    """A parent and one worker (in this process) joined by a socketpair."""

    def __init__(self, k: int = 1, n: int = 2) -> None:
        self.sink = RecordingSink()
        self.parent = Pipeline(config(workers=n), Metrics(), sink=self.sink)
        self.worker_p = Pipeline(config(workers=n), Metrics(), sink=RecordingSink())
        a, b = socket.socketpair()
        self.shards = Shards(self.parent)
        self.handle = _Handle(k, -1, Connection(a.detach()))
        self.shards.workers.append(self.handle)
        self.worker = Worker(self.worker_p, k, n, Connection(b.detach()), (True, None))
        self.stop = threading.Event()
        self.shards.stop = self.stop

    def start_control(self) -> None:
        threading.Thread(target=self.worker._control, daemon=True).start()

    def start_reader(self) -> threading.Thread:
        t = threading.Thread(target=self.shards._read, args=(self.handle,), daemon=True)
        t.start()
        return t


def test_pod_index_and_cidr_changes_are_replayed_in_the_worker() -> None:
    """update, delete, reconcile (also from a one-shot iterable) and set_cidrs made in the
    parent after the hook reach the worker's copies, which end up equal."""
    pair = Pair()
    pair.shards._hook_replication()
    pair.start_control()
    p, w = pair.parent, pair.worker_p
    a = PodMeta(namespace="ns", name="a", uid="ua", ips=((4, POD),), created_ns=T0)
    b = PodMeta(namespace="ns", name="b", uid="ub", ips=((4, POD + 1),), created_ns=T0)
    p.index.update(a, T0 + S)
    p.index.delete("ua", T0 + 2 * S)
    p.index.reconcile(iter([b]), T0 + 3 * S)
    p.filter.set_cidrs(["10.16.0.0/16", "10.17.0.0/16"], ["10.96.0.0/12"])
    until(lambda: w.filter.cluster_cidrs == p.filter.cluster_cidrs)
    for ip in (POD, POD + 1):
        assert w.index.history(4, ip) == p.index.history(4, ip)
    assert w.index.history(4, POD)  # a's closed interval is there
    assert w.filter.pod_cidrs == p.filter.pod_cidrs


def test_source_freshness_is_mirrored_and_stop_and_eof_end_the_worker() -> None:
    """States sent by the parent appear in the worker's wait stage (stale flag included);
    "stop" sets the worker's stop; so does the parent's pipe closing."""
    pair = Pair()
    pair.start_control()
    st = SourceState("kubernetes", stale=True, now_ns=T0)
    pair.shards.broadcast(("go", [("kubernetes", True, T0, None, "watch failed", 0)]))
    until(pair.worker.go.is_set)
    [mirror] = pair.worker_p.wait.states
    assert (mirror.name, mirror.stale, mirror.reason) == (st.name, True, "watch failed")
    pair.shards.broadcast(("states", [("kubernetes", False, None, T0 + S, "", 1)]))
    until(lambda: not mirror.stale)
    assert mirror.recoveries == 1
    pair.shards.broadcast(("stop",))
    until(pair.worker.stop.is_set)
    other = Pair()
    other.start_control()
    other.handle.conn.close()
    until(other.worker.stop.is_set)


def test_batches_and_counters_reach_the_parent_as_totals() -> None:
    """A worker's records arrive in the parent's one delivery (renumbered there), and its
    counters are added to the parent's metrics as deltas, with the per-worker view."""
    pair = Pair()
    w, wp = pair.worker, pair.worker_p
    wp.out.submit = w._send_batch  # type: ignore[method-assign]
    wp.index.update(PodMeta(namespace="ns", name="a", uid="ua", ips=((4, POD),),
                            created_ns=T0), T0)
    pair.parent.delivery.start()
    reader = pair.start_reader()
    for sport in range(1000, 1010):
        wp.handle(flow(sport))
    b = wp.out.batcher.flush()
    assert b is not None
    w.send(("batch", b))
    wp._flush_counters()
    w.send_counts()
    wp.handle(flow(2000))
    wp._flush_counters()
    w.send_counts()  # only the delta: one more event
    w.send(("done",))
    pair.stop.set()
    w.conn.close()
    reader.join(5)
    assert pair.parent.out.close(5)
    names = [orjson.loads(e)["kubernetes"]["pod"]["name"] for e in pair.sink.entries]
    assert names == ["a"] * 10
    assert pair.sink.seqs == [1]
    m = pair.parent.metrics
    assert m.value("shipper_events_total", "new") == 11
    assert m.value("shipper_records_total", "new") == 11
    assert m.value("shipper_worker_events_total", "1") == 11
    assert pair.shards.failure is None


def test_a_worker_that_exits_unasked_stops_the_agent_with_a_gap() -> None:
    """A worker whose pipe closes without "done": the failure is kept for the exit code,
    counted, the run's stop is set and a gap record covers its share since last heard."""
    pair = Pair()
    reader = pair.start_reader()
    pair.worker.conn.close()
    reader.join(5)
    assert pair.stop.is_set()
    assert pair.shards.failure is not None and "exited unexpectedly" in pair.shards.failure
    assert pair.parent.metrics.value("shipper_errors_total", "worker", "exited") == 1
    b = pair.parent.out.batcher.flush()
    assert b is not None and len(b.entries) == 1
    assert orjson.loads(b.entries[0])["event"]["action"] == "gap"


def test_a_worker_error_is_reported_as_the_failure() -> None:
    """A worker that reports an error (e.g. its socket could not be opened) fails the
    agent with that error, even though it said "done"."""
    pair = Pair()
    reader = pair.start_reader()
    pair.worker.send(("error", "cannot subscribe"))
    pair.worker.send(("done",))
    pair.worker.conn.close()
    reader.join(5)
    assert pair.shards.failure is not None and "cannot subscribe" in pair.shards.failure
    assert pair.parent.metrics.value("shipper_errors_total", "worker", "failed") == 1


class CapturedSource:
    """Stands in for a worker's ConntrackSource: serves the captured kernel messages the
    real BPF share program keeps for this worker, once."""

    def __init__(self, real: Any, messages: list[bytes]) -> None:
        self.real = real
        self.messages = messages
        self.share: tuple[int, int] | None = None
        self.decoder = LayoutDecoder()
        self.done = False

    def open(self) -> None:
        assert self.share is not None
        prog = bpf.build_program(["0.0.0.0/0", "::/0"], share=self.share)
        self.messages = [m for m in self.messages if bpf.run_program(prog, m) == bpf.KEEP]

    def close(self) -> None:
        pass

    def dump(self) -> Iterable[FlowEvent]:
        return ()

    def wait(self, timeout_ms: int) -> None:
        time.sleep(0.005)

    def read_burst(self, handle: Callable[[FlowEvent], None]) -> int:
        if self.done:
            return 0
        self.done = True
        for m in self.messages:
            ev, _ = self.decoder.decode(bytearray(m), 0, T0)
            if ev is not None:
                handle(ev)
        return len(self.messages)

    def after_burst(self, burst: int, handle_all: Any) -> None:
        pass

    def drain_at_stop(self, handle: Any, grace_s: float, flush: Callable[[], None]) -> None:
        flush()


@pytest.mark.parametrize("n", [2, 3])
def test_forked_workers_ship_each_captured_event_once(n: int) -> None:
    """N forked workers, each keeping its share of the captured kernel messages by the
    BPF share program, and one parent delivery: every flow event is shipped exactly
    once, every worker contributed, and stop ends the run cleanly (exit 0)."""
    cfg = Config(filter={"pod_cidrs": ["0.0.0.0/0", "::/0"], "only_snat": False},
                 enrich={"resolve_wait_s": 0},
                 conntrack={"set_sysctls": False, "dump_at_start": False, "workers": n},
                 batch={"max_age_s": 0.05}, shutdown_grace_s=5, metrics={"address": None})
    sink = RecordingSink()
    p = Pipeline(cfg, Metrics(), sink=sink)
    shards = Shards(p)

    def child_main(w: Worker) -> int:
        w.p.source = CapturedSource(w.p.source, MESSAGES)  # type: ignore[assignment]
        return w.main()

    shards.fork(child_main)
    stop = threading.Event()
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(shards.run(stop)), daemon=True)
    t.start()
    want = sorted((e.ct_id, e.action) for e in (decode_generic(m, 0, 0) for m in MESSAGES)
                  if e is not None)
    until(lambda: len(sink.entries) >= len(want), timeout=20)
    until(lambda: all(p.metrics.value("shipper_worker_events_total", str(k)) > 0
                      for k in range(n)), timeout=10)
    stop.set()
    t.join(20)
    assert result == [0]
    got = sorted((r["conntrack"]["id"], r["event"]["action"])
                 for r in (orjson.loads(e) for e in sink.entries))
    assert got == want
    assert p.metrics.total("shipper_events_total") == len(want)


def test_dumps_keep_the_share_by_the_socket_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """ConntrackSource.dump with a share returns the entries whose id is k mod n; an entry
    without an id belongs to worker 0 (as with the BPF share clause)."""
    from shipper.sources import conntrack

    evs = [flow(1000)._replace(ct_id=i) for i in (1, 2, 3, 4)] + [flow(1)._replace(ct_id=None)]
    monkeypatch.setattr(conntrack, "dump_table", lambda *a, **k: iter(evs))
    src = Pipeline(config(), Metrics(), sink=RecordingSink()).source
    assert list(src.dump()) == evs
    src.share = (0, 2)
    assert [e.ct_id for e in src.dump()] == [2, 4, None]
    src.share = (1, 2)
    assert [e.ct_id for e in src.dump()] == [1, 3]


def _chunks(messages: list[bytes], per: int = 7) -> list[bytes]:
    """The messages as a dump's reads: ``per`` whole messages to a chunk (each padded to
    4 bytes, as the kernel aligns them), NLMSG_DONE after the last."""
    padded = [m + b"\0" * (-len(m) % 4) for m in messages]
    done = struct.pack("=IHHIIi", 20, NLMSG_DONE, 2, 1, 0, 0)
    chunks = [b"".join(padded[i:i + per]) for i in range(0, len(padded), per)]
    chunks[-1] += done
    return chunks


def _one_shot(n: int, chunks: Callable[[], Iterable[bytes]],
              child_main: Callable[[Worker], int] | None = None
              ) -> tuple[Shards, Pipeline, RecordingSink]:
    cfg = Config(filter={"pod_cidrs": ["0.0.0.0/0", "::/0"], "only_snat": False},
                 enrich={"resolve_wait_s": 0},
                 conntrack={"set_sysctls": False, "workers": n},
                 batch={"max_age_s": 0.05}, shutdown_grace_s=5, metrics={"address": None})
    sink = RecordingSink()
    p = Pipeline(cfg, Metrics(), sink=sink)
    p.source.dump_chunks = chunks  # type: ignore[method-assign,assignment]

    def no_sysctls() -> tuple[bool, int | None]:
        raise AssertionError("a one-shot dump reads the table as it is: no sysctls")

    p.source.sysctls = no_sysctls  # type: ignore[method-assign]
    shards = Shards(p)
    shards.fork(child_main, one_shot=True)
    return shards, p, sink


@pytest.mark.parametrize("n", [2, 3])
def test_one_shot_dump_over_forked_workers_ships_each_entry_once(n: int) -> None:
    """`dump` with N workers: the parent's reads (here the captured kernel messages as
    chunks) go round robin to N forked workers, which decode, attribute and encode them;
    every entry is delivered exactly once by the parent, every worker had a part, the
    counters are the workers' sum, the dump ends by itself with exit 0, and the conntrack
    sysctls are neither set nor read (as in the one-process dump)."""
    shards, p, sink = _one_shot(n, lambda: iter(_chunks(MESSAGES)))
    t0 = time.monotonic()
    assert shards.dump() == 0
    assert time.monotonic() - t0 < 20
    want = sorted((e.ct_id, e.action) for e in (decode_generic(m, 0, 0) for m in MESSAGES)
                  if e is not None)
    got = sorted((r["conntrack"]["id"], r["event"]["action"])
                 for r in (orjson.loads(e) for e in sink.entries))
    assert got == want
    assert all(h.entries > 0 for h in shards.workers)
    assert sum(h.entries for h in shards.workers) == len(want)
    assert p.metrics.total("shipper_events_total") == len(want)
    assert all(_reaped_already(h.pid) for h in shards.workers)


def _reaped_already(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def test_one_shot_dump_fails_when_the_kernel_refuses_midway() -> None:
    """A dump that fails after its first read (the kernel refused it, or it stalled):
    the workers are stopped, no worker is left, and the failure is the SourceError."""
    chunks = _chunks(MESSAGES)

    def refused() -> Iterator[bytes]:
        yield chunks[0]
        raise SourceError("conntrack dump refused: Operation not permitted")

    shards, _p, _sink = _one_shot(2, refused)
    with pytest.raises(SourceError, match="refused"):
        shards.dump()
    assert all(_reaped_already(h.pid) for h in shards.workers)


def test_one_shot_dump_fails_when_a_worker_dies() -> None:
    """A worker that dies during the dump: its part is missing, so the dump fails (a
    SourceError naming the worker) with a gap record delivered, and the other worker is
    stopped, not left waiting for chunks."""
    def child_main(w: Worker) -> int:
        if w.k == 1:
            os._exit(9)
        return w.dump_main()

    many = _chunks(MESSAGES * 50)
    shards, p, sink = _one_shot(2, lambda: iter(many), child_main)
    with pytest.raises(SourceError, match="reader 1"):
        shards.dump()
    assert any(orjson.loads(e)["event"]["action"] == "gap" for e in sink.entries)
    assert p.metrics.value("shipper_errors_total", "worker", "exited") == 1
    assert all(_reaped_already(h.pid) for h in shards.workers)


def test_one_shot_dump_fails_when_a_worker_ends_without_its_part() -> None:
    """A worker that ends cleanly ("done") but never did its part of the dump (here
    stopped before it began): the dump fails naming it, never exit 0 with its entries
    missing."""
    def child_main(w: Worker) -> int:
        if w.k == 0:
            w.stop.set()
        return w.dump_main()

    shards, _p, sink = _one_shot(2, lambda: iter(_chunks(MESSAGES)), child_main)
    with pytest.raises(SourceError, match=r"reader 0 .*ended before its part"):
        shards.dump()
    assert any(orjson.loads(e)["event"]["action"] == "gap" for e in sink.entries)
    assert all(_reaped_already(h.pid) for h in shards.workers)


def test_workers_flag_and_key() -> None:
    """`run --workers N` and `dump --workers N` set conntrack.workers; 0 and more than
    the maximum are named configuration errors, not ignored."""
    from shipper import cli
    from shipper import config as config_mod
    from shipper.errors import ConfigError

    args = cli.build_parser().parse_args(["run", "--workers", "2", "--pod-cidr", "10.0.0.0/8"])
    assert config_mod.load(None, cli.overrides_from_args(args)).conntrack.workers == 2
    for bad in ("0", "99"):
        args = cli.build_parser().parse_args(["run", "--workers", bad, "--pod-cidr",
                                              "10.0.0.0/8"])
        with pytest.raises(ConfigError, match=r"conntrack\.workers"):
            config_mod.load(None, cli.overrides_from_args(args))
    dump = cli.build_parser().parse_args(["dump", "--pod-cidr", "10.0.0.0/8"])
    assert "conntrack.workers" not in cli.overrides_from_args(dump)
    dump = cli.build_parser().parse_args(["dump", "--workers", "3", "--pod-cidr",
                                          "10.0.0.0/8"])
    assert config_mod.load(None, cli.overrides_from_args(dump)).conntrack.workers == 3
