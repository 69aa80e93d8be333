"""Pipeline's flow-start cache: what it remembers, its bound, and the evictions it counts."""

from __future__ import annotations

import ipaddress

import orjson

from shipper.config import Config
from shipper.metrics import Metrics
from shipper.pipeline import Pipeline
from shipper.record import ACTION_DESTROY, ACTION_NEW, ACTION_SNAPSHOT, FlowEvent, PodMeta
from tests.fakes.sinks import BatcherSink

S = 1_000_000_000
T0 = 1_795_766_503 * S
POD = int(ipaddress.ip_address("10.16.0.5"))
REMOTE = int(ipaddress.ip_address("93.184.216.34"))
NODE = int(ipaddress.ip_address("192.168.1.10"))


def event(action: str, ct_id: int, read_ns: int, ts_start: int | None = None) -> FlowEvent:
    """An event of MASQUERADEd TCP flow ``ct_id`` from the pod, read at ``read_ns``.

    ``ts_start`` is the kernel's start timestamp (NEW never has one; DESTROY and
    dumped entries have one when nf_conntrack_timestamp=1).
    """
    return FlowEvent(
        action, 4, 6, POD, REMOTE, 40000 + ct_id, 443, REMOTE, NODE, 443, 61000 + ct_id,
        None, None, None, ct_id, None, None, None, None, None, None, None, None, None,
        ts_start, None, None, read_ns,
    )


def pipeline(cache: int, events: list[str] | None = None) -> tuple[Pipeline, Metrics]:
    cfg = Config(filter={"pod_cidrs": ["10.16.0.0/16"]},
                 conntrack={"flow_start_cache": cache,
                            "events": events or ["new", "destroy"]},
                 enrich={"resolve_wait_s": 0})
    m = Metrics()
    p = Pipeline(cfg, m, sink=BatcherSink())
    a = PodMeta(namespace="ns", name="a", uid="ua", ips=((4, POD),), phase="Running",
                created_ns=T0).with_record_object()
    p.index.update(a, T0)
    return p, m


def starts(p: Pipeline) -> list[str | None]:
    """``event.start`` of each record built so far."""
    b = p.batcher.flush()
    return [] if b is None else [orjson.loads(e)["event"].get("start") for e in b.entries]


def iso(t_ns: int) -> str:
    from shipper.ecs import rfc3339

    return rfc3339(t_ns)


class TestBound:
    def test_full_cache_evicts_the_oldest_and_counts_it(self) -> None:
        """With room for 2 starts, a third NEW evicts the oldest: its DESTROY (no kernel
        timestamp) has no remembered start, the others' do; one eviction, reason full."""
        p, m = pipeline(2)
        for ct in (1, 2, 3):
            p.handle(event(ACTION_NEW, ct, T0 + ct * S))
        assert len(p.starts.cache) == 2
        for ct in (1, 2, 3):
            p.handle(event(ACTION_DESTROY, ct, T0 + 100 * S))
        got = starts(p)[3:]
        assert got == [None, iso(T0 + 2 * S), iso(T0 + 3 * S)]
        p._flush_counters()
        assert m.value("shipper_flow_starts_evicted_total", "full") == 1

    def test_destroy_removes_its_entry_without_counting(self) -> None:
        """A DESTROY takes its flow's start out of the cache; that is no eviction."""
        p, m = pipeline(10)
        p.handle(event(ACTION_NEW, 1, T0 + S))
        p.handle(event(ACTION_DESTROY, 1, T0 + 9 * S))
        assert p.starts.cache == {}
        p._flush_counters()
        assert m.value("shipper_flow_starts_evicted_total", "full") == 0

    def test_bounded_by_the_conntrack_table_size(self) -> None:
        """The cache never holds more entries than nf_conntrack_max; shrinking it to that
        size evicts the oldest entries and counts them."""
        p, m = pipeline(10)
        for ct in range(1, 6):
            p.handle(event(ACTION_NEW, ct, T0 + ct * S))
        p.starts.size(kernel_timestamps=False, table_max=3)
        assert p.starts.max_entries == 3
        assert len(p.starts.cache) == 3
        p.handle(event(ACTION_NEW, 6, T0 + 6 * S))
        assert len(p.starts.cache) == 3
        p._flush_counters()
        assert m.value("shipper_flow_starts_evicted_total", "full") == 3


class TestWhatIsRemembered:
    def test_new_not_remembered_when_the_kernel_stamps_destroy(self) -> None:
        """With kernel timestamps and no update events, a NEW's start is not kept (its
        DESTROY carries the kernel's): the record still has the kernel's start."""
        p, _ = pipeline(10)
        p.starts.size(kernel_timestamps=True, table_max=None)
        p.handle(event(ACTION_NEW, 1, T0 + S))
        assert p.starts.cache == {}
        p.handle(event(ACTION_DESTROY, 1, T0 + 9 * S, ts_start=T0 + S // 2))
        assert starts(p)[1] == iso(T0 + S // 2)

    def test_snapshot_without_kernel_timestamp_is_remembered(self) -> None:
        """A dumped flow without a kernel timestamp (created before the sysctl was set) is
        remembered even with kernel timestamps on: its DESTROY will have none either."""
        p, _ = pipeline(10)
        p.starts.size(kernel_timestamps=True, table_max=None)
        p.handle(event(ACTION_SNAPSHOT, 1, T0 + S))
        p.handle(event(ACTION_SNAPSHOT, 2, T0 + S, ts_start=T0))
        assert list(p.starts.cache.values()) == [T0 + S]
        p.handle(event(ACTION_DESTROY, 1, T0 + 9 * S))
        assert starts(p)[2] == iso(T0 + S)

    def test_update_subscription_remembers_new(self) -> None:
        """UPDATE events carry no kernel start: with them subscribed NEW starts are kept."""
        p, _ = pipeline(10, ["new", "update", "destroy"])
        p.starts.size(kernel_timestamps=True, table_max=None)
        p.handle(event(ACTION_NEW, 1, T0 + S))
        assert len(p.starts.cache) == 1

    def test_no_kernel_timestamps_remembers_new(self) -> None:
        """Without kernel timestamps every NEW's start is kept for its later events."""
        p, _ = pipeline(10)
        p.starts.size(kernel_timestamps=False, table_max=None)
        p.handle(event(ACTION_NEW, 1, T0 + S))
        p.handle(event(ACTION_DESTROY, 1, T0 + 9 * S))
        assert starts(p)[1] == iso(T0 + S)
