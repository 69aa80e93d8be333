"""The sink interface every output implements, and the batch it receives.

A sink has two halves (Vector's split): ``encode`` is pure and runs on the
event path, turning one record into the bytes of its wire format; ``deliver``
does I/O for a whole batch and raises :class:`~shipper.errors.SinkError` with
``retriable`` set to its verdict. The delivery worker (``shipper.delivery``),
not the sink, owns retries, backoff and counting.

What a sink can do is declared, not probed: every sink sets ``entry_format``
(what one encoded entry is, which lets the pipeline pick the fused NDJSON
encoder), ``acknowledged`` (whether a returned ``deliver`` means the receiver
confirmed the records) and defines ``abort`` (a no-op where ``deliver`` cannot
block on a peer).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol


@dataclass(slots=True)
class Batch:
    """Encoded records on their way to one sink.

    ``entries`` holds one encoded record each (in the sink's own format, as
    returned by :meth:`Sink.encode`); ``times`` the matching event times in ns.
    ``seq`` numbers batches in the order they were closed.
    """

    seq: int
    entries: list[bytes] = field(default_factory=list)
    times: list[int] = field(default_factory=list)
    nbytes: int = 0
    opened_mono: float = 0.0

    def __len__(self) -> int:
        return len(self.entries)


#: What one encoded entry (``Sink.encode``'s result) is:
#: ``ndjson`` - one JSON line ending in ``\n``, exactly what ``shipper.ecs_json``'s fused
#: encoder writes, so the pipeline uses that encoder (same bytes, half the CPU);
#: ``msgpack`` - a forward-protocol entry ``[EventTime, record]``;
#: ``rfc5424`` - one RFC 5424 syslog message without framing.
EntryFormat = Literal["ndjson", "msgpack", "rfc5424"]


class Sink(Protocol):
    """One output. Implementations: ``stdout``, ``file``, ``forward``, ``syslog``.

    Each declares all of the members below; nothing is looked up with ``getattr``.
    """

    name: str
    #: What ``encode`` returns per record (see :data:`EntryFormat`).
    entry_format: EntryFormat
    #: True when ``deliver`` returns only after the receiver confirmed every record
    #: (forward with ``ack``, syslog over RELP); False when it returns once the bytes were
    #: handed to the operating system (stdout, file, forward without ack, syslog tcp/tls).
    #: Either way a record counts as shipped when ``deliver`` returned.
    acknowledged: bool

    def encode(self, record: dict[str, Any], time_ns: int) -> bytes:
        """Encode one record (pure, called on the event path)."""
        ...

    def deliver(self, batch: Batch) -> Mapping[str, int] | None:
        """Write or send the whole batch; return only once it is confirmed.

        Raises SinkError(retriable=...) on failure. Must not block for longer
        than the sink's own configured timeouts. Returns None when every record
        was delivered, or ``{reason: count}`` for records the sink left out on
        purpose (the delivery worker counts them as dropped with that reason
        and the rest as shipped).
        """
        ...

    def abort(self) -> None:
        """Make a ``deliver`` in progress (in another thread) fail at once.

        ``Delivery.close`` calls it when the shutdown grace period is over, so SIGTERM
        is never held up by a receiver that stopped answering: network sinks shut
        their socket down; sinks whose ``deliver`` does not wait on a peer do nothing.
        """
        ...

    def close(self) -> None:
        """Release files and connections. Called once, after the last deliver."""
        ...
