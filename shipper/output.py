"""The record path's tail: encode -> batch -> delivery.

:class:`RecordOutput` turns an attributed event (or a gap notice) into the sink's
encoded entry, adds it to the open batch and hands closed batches to
:class:`~shipper.delivery.Delivery`. NDJSON sinks get the fused line encoder
(:mod:`shipper.ecs_json`: the same lines for half the CPU); the others build the
record dict (:func:`shipper.ecs.build_record`) and encode it with the sink's own
``encode``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from shipper import ecs
from shipper.batch import Batch, Batcher
from shipper.config import Config
from shipper.delivery import Delivery
from shipper.ecs import event_time
from shipper.ecs_json import JsonLineEncoder
from shipper.health import Health
from shipper.metrics import Metrics
from shipper.record import FlowEvent
from shipper.sinks import Sink
from shipper.sinks.retry import RetryPolicy
from shipper.sinks.spool import open_spool


class RecordOutput:
    """Encoder, batcher and delivery of one sink; ``records`` counts records by action."""

    def __init__(self, cfg: Config, sink: Sink, metrics: Metrics, health: Health,
                 records: dict[str, int]) -> None:
        self.host = cfg.node_name
        self.sink = sink
        self.health = health
        self.records = records
        self.encode = sink.encode
        self._lines = JsonLineEncoder(self.host) if sink.entry_format == "ndjson" else None
        b, q, s = cfg.batch, cfg.queue, cfg.sink
        self.batcher = Batcher(max_records=b.max_records, max_bytes=b.max_bytes,
                               max_age_s=b.max_age_s)
        self.delivery = Delivery(
            sink, metrics, max_batches=q.max_batches, overflow=q.overflow,
            retry=RetryPolicy(s.retry_initial_s, s.retry_max_s, s.max_retries),
            spool=open_spool(s.spool, sink.name, metrics))
        self.stop = threading.Event()  # the run's stop: ends a wait for room in the queue

    def record(self, ev: FlowEvent, pod: Any, remembered: int | None, attribution: str) -> None:
        """Encode and batch the record of one attributed event."""
        self.records[ev.action] += 1  # every label is there from the start (EventCounts)
        t_ev = event_time(ev)  # once: the encoder and the batch both need it
        lines = self._lines
        if lines is not None:
            entry = lines.encode(ev, pod, remembered, attribution, t_ev)
        else:
            entry = self.encode(ecs.build_record(ev, pod, self.host, flow_start_ns=remembered,
                                                 attribution=attribution, t_ns=t_ev), t_ev)
        closed = self.batcher.add(entry, t_ev)
        if closed:
            for b in closed:
                self.submit(b)

    def gap(self, since_ns: int, until_ns: int, lost: int | None, overruns: int,
            resync: bool) -> None:
        """A gap notice from the source becomes a gap record."""
        rec = ecs.gap_record(self.host, since_ns=since_ns, until_ns=until_ns, lost=lost,
                             overruns=overruns, resync=resync)
        for b in self.batcher.add(self.encode(rec, until_ns), until_ns, time.monotonic()):
            self.submit(b)
        self.records["gap"] = self.records.get("gap", 0) + 1

    def due(self, now_m: float) -> None:
        """Hand on the open batch if it is old enough."""
        b = self.batcher.due(now_m)
        if b is not None:
            self.submit(b)

    def submit(self, b: Batch) -> None:
        """Hand a closed batch to delivery; a wait for room is backpressure, not a stall."""
        with self.health.blocked("the sink (queue or spool full)"):
            self.delivery.submit(b, self.stop)

    def close(self, grace_s: float) -> bool:
        """Hand on the open batch and stop delivery within ``grace_s``; True if everything
        was delivered."""
        b = self.batcher.flush()
        if b is not None:
            self.delivery.submit(b, None)
        return self.delivery.close(grace_s)
