"""A sink for pipeline unit tests: records are read back from the pipeline's batcher.

It declares the :class:`shipper.sinks.base.Sink` members and encodes records as JSON;
``deliver`` is never reached in these tests (the test flushes the batcher itself).
"""

from __future__ import annotations

from typing import Any

import orjson

from shipper.sinks.base import Batch, EntryFormat


class BatcherSink:
    """Never delivers; ``entry_format`` picks the pipeline's encoder (ndjson: the fused one)."""

    acknowledged = False

    def __init__(self, entry_format: EntryFormat = "msgpack", name: str = "recording") -> None:
        self.entry_format: EntryFormat = entry_format
        self.name = name

    def encode(self, record: dict[str, Any], time_ns: int) -> bytes:
        return orjson.dumps(record)

    def deliver(self, batch: Batch) -> None:  # pragma: no cover - never called here
        raise AssertionError("not used")

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass
