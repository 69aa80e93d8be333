"""A stand-in for the conntrack event socket that hands out captured datagrams.

The replay benchmarks (``bench_replay.py``, ``bench_callgrind.py``) drive the real
receive loop, ``ConntrackSource.read_burst``, with it instead of copying that loop:
``recv_into`` copies the next datagram into the source's receive buffer, as the
kernel does, and raises ``BlockingIOError`` once none is left (an empty socket).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from shipper.record import FlowEvent
from shipper.sources.decode import LayoutDecoder


class ReplaySocket:
    """``recv_into`` returns the datagrams given, one per call, then ``BlockingIOError``."""

    def __init__(self, datagrams: Iterable[bytes]) -> None:
        self._next = iter(datagrams).__next__

    def recv_into(self, buf: bytearray) -> int:
        try:
            d = self._next()
        except StopIteration:
            raise BlockingIOError from None
        n = len(d)
        buf[:n] = d
        return n


def replay(source: Any, datagrams: Iterable[bytes], handle: Callable[[FlowEvent], None]
           ) -> None:
    """Run ``datagrams`` through ``source.read_burst(handle)`` (a ConntrackSource that
    was never opened) until they are all read."""
    source.sock = ReplaySocket(datagrams)
    while source.read_burst(handle):
        pass


def decode_all(datagrams: Iterable[bytes]) -> list[FlowEvent]:
    """The flow events ``datagrams`` hold, decoded apart (a decoder of its own)."""
    decode = LayoutDecoder().decode
    events = []
    for d in datagrams:
        off = 0
        while off < len(d):
            ev, mlen = decode(d, off, 0)
            if ev is not None:
                events.append(ev)
            off += (mlen + 3) & ~3
    return events


def count_events(datagrams: Iterable[bytes]) -> int:
    """How many flow events ``datagrams`` hold."""
    return len(decode_all(datagrams))
