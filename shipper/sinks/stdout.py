"""stdout sink: NDJSON, one record per line, flushed per batch."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import IO, Any

import orjson

from shipper.errors import SinkError
from shipper.sinks.base import Batch, EntryFormat

_OPTS = orjson.OPT_APPEND_NEWLINE


def encode_json(record: dict[str, Any], time_ns: int) -> bytes:
    """One NDJSON line (pure)."""
    return orjson.dumps(record, option=_OPTS)


class StdoutSink:
    """Writes each batch to standard output in one write and flushes it."""

    name = "stdout"
    encode = staticmethod(encode_json)
    #: Entries are NDJSON lines: the pipeline may use the fused event encoder
    #: (``shipper.ecs_json``), which yields the same lines as ``encode``.
    entry_format: EntryFormat = "ndjson"
    #: Done when the write returned (and fsync, if configured): nobody confirms reading it.
    acknowledged = False

    def __init__(self, stream: IO[bytes] | None = None) -> None:
        self._out = stream if stream is not None else sys.stdout.buffer

    def deliver(self, batch: Batch) -> None:
        """Write and flush; a closed pipe is final, other OS errors are retriable."""
        try:
            self._out.write(b"".join(batch.entries))
            self._out.flush()
        except BrokenPipeError as exc:
            raise SinkError("stdout is closed (broken pipe)", retriable=False) from exc
        except ValueError as exc:  # the stream object itself was closed
            raise SinkError(f"stdout is closed ({exc})", retriable=False) from exc
        except OSError as exc:
            raise SinkError(f"stdout write failed: {os.strerror(exc.errno or 0)}",
                            retriable=True) from exc

    def abort(self) -> None:
        """Nothing to interrupt: a write to stdout waits on no peer the shipper could cut."""

    def close(self) -> None:
        """Flush; stdout itself stays open."""
        with contextlib.suppress(OSError, ValueError):
            self._out.flush()
