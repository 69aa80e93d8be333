"""The sink interface every output implements, and the batch it receives.

A sink has two halves (Vector's split): ``encode`` is pure and runs on the
event path, turning one record into the bytes of its wire format; ``deliver``
does I/O for a whole batch and raises :class:`~shipper.errors.SinkError` with
``retriable`` set to its verdict. The delivery worker (``shipper.delivery``),
not the sink, owns retries, backoff and counting.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


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


class Sink(Protocol):
    """One output. Implementations: ``stdout``, ``file``, ``forward``, ``syslog``."""

    name: str

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

    def close(self) -> None:
        """Release files and connections. Called once, after the last deliver."""
        ...


# Optional: a sink whose ``deliver`` can block on the network may also define
# ``abort() -> None``, which makes a ``deliver`` in progress fail at once (shut
# the socket down). ``Delivery.close`` calls it when the shutdown grace period
# is over, so SIGTERM is never held up by a receiver that stopped answering.
