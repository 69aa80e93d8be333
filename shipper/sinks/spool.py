"""The disk spool: a write-ahead log of closed batches in front of a sink.

When the spool is enabled, the delivery buffer
(:class:`~shipper.delivery.buffer.DeliveryBuffer`) appends every
closed batch here (written and fsynced) *before* queueing it, and commits it
only after the sink confirmed it (or it was dropped and counted). Whatever is
not committed when the process stops - cleanly, by SIGKILL or by a crash - is
found again by :meth:`Spool.recover` and replayed first, in order.

On disk (one directory)::

    00000000000000000001.seg   segment: header, then frames
    00000000000000000002.seg
    checkpoint                 first unconfirmed position (segment id, offset)

* segment header: ``b"FLSPOOL1"``, one byte name length, the sink name (a
  spool written for one sink's wire format is never replayed into another);
* frame: ``<u32 payload length><u32 crc32(payload)><payload>``; payload:
  ``<u32 n><u64 seq>``, ``n`` u64 event times, ``n`` u32 entry lengths, the
  entries. A crash mid-append leaves a torn tail: recovery finds it by length
  and CRC, cuts it off and counts it (its batch had not been acknowledged to
  the caller: ``append`` had not returned).
* the checkpoint is rewritten in place (20 bytes, CRC-checked) on every
  commit without fsync: it survives a process crash (page cache); after a
  power loss it may be stale or torn, which only replays confirmed batches
  again - duplicates, never loss (records carry ``event.id``).

Space is freed a whole segment at a time, when the checkpoint passes a
sealed segment. The size cap (``max_bytes``) counts segment files.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shipper.sinks.base import Batch

if TYPE_CHECKING:
    from shipper.config import SpoolConfig
    from shipper.metrics import Metrics

log = logging.getLogger("shipper.spool")

MAGIC = b"FLSPOOL1"
_FRAME = struct.Struct("<II")
_PAYLOAD_HEAD = struct.Struct("<IQ")
_CKPT = struct.Struct("<QQ")
_SEG_RE = re.compile(r"^(\d{20})\.seg$")


@dataclass(frozen=True, slots=True)
class SpoolRef:
    """Where one spooled batch lives: segment id, frame start and end offsets."""

    seg: int
    off: int
    end: int
    records: int


def encode_frame(batch: Batch) -> bytes:
    """One batch as a frame (pure)."""
    n = len(batch.entries)
    payload = b"".join((
        _PAYLOAD_HEAD.pack(n, batch.seq),
        struct.pack(f"<{n}Q", *batch.times),
        struct.pack(f"<{n}I", *map(len, batch.entries)),
        *batch.entries,
    ))
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def decode_payload(payload: bytes | memoryview) -> Batch:
    """The inverse of :func:`encode_frame`'s payload; ValueError if inconsistent."""
    n, seq = _PAYLOAD_HEAD.unpack_from(payload, 0)
    pos = _PAYLOAD_HEAD.size
    times = list(struct.unpack_from(f"<{n}Q", payload, pos))
    pos += 8 * n
    lengths = struct.unpack_from(f"<{n}I", payload, pos)
    pos += 4 * n
    entries = []
    view = memoryview(payload)
    for length in lengths:
        entries.append(bytes(view[pos:pos + length]))
        pos += length
    if pos != len(payload):
        raise ValueError("frame payload length does not match its entries")
    return Batch(seq=seq, entries=entries, times=times, nbytes=pos, opened_mono=time.monotonic())


def _records_in(payload: bytes | memoryview) -> int:
    return int(_PAYLOAD_HEAD.unpack_from(payload, 0)[0])


class Spool:
    """Append, read back, commit; thread-safe (one lock)."""

    def __init__(
        self,
        directory: Path,
        *,
        sink_name: str,
        metrics: Metrics,
        max_bytes: int,
        segment_bytes: int,
        full_policy: str = "block",
        fsync: bool = True,
    ) -> None:
        if full_policy not in ("block", "drop_oldest"):
            raise ValueError(f"unknown spool full policy {full_policy!r}")
        self.dir = Path(directory)
        self.sink_name = sink_name
        self.metrics = metrics
        self.max_bytes = max_bytes
        self.segment_bytes = max(4096, min(segment_bytes, max_bytes // 4))
        self.full_policy = full_policy
        self.fsync = fsync
        name = sink_name.encode()
        self._header = MAGIC + bytes((len(name),)) + name
        self._lock = threading.Lock()
        self._sizes: dict[int, int] = {}  # segment id -> bytes on disk
        self._pending: dict[int, list[int]] = {}  # segment id -> [batches, records] unconfirmed
        self._ckpt = (0, 0)
        self._ckpt_fd: int | None = None
        self._writer: int | None = None  # fd of the current segment
        self._writer_seg = 0
        self._next_seg = 1
        self._read_fd: tuple[int, int] | None = None  # (segment id, fd)
        self._recovered = False

    # --- start ------------------------------------------------------------------------

    def recover(self) -> list[SpoolRef]:
        """Scan the directory; return the unconfirmed batches in order.

        Cuts off torn or corrupt frames (counted in ``shipper_spool_torn_frames_total``),
        deletes confirmed segments, moves segments written for another sink to
        ``incompatible/`` (their records counted as dropped, reason ``spool_incompatible``).
        Must be called once before :meth:`append`.
        """
        with self._lock:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._ckpt_fd = os.open(self.dir / "checkpoint", os.O_RDWR | os.O_CREAT, 0o600)
            self._ckpt = self._read_ckpt()
            segs = sorted(int(m.group(1)) for f in os.listdir(self.dir)
                          if (m := _SEG_RE.match(f)))
            refs: list[SpoolRef] = []
            for seg in segs:
                self._next_seg = max(self._next_seg, seg + 1)
                if seg < self._ckpt[0]:
                    self._unlink(seg)
                    continue
                refs.extend(self._scan(seg))
            self._recovered = True
            self._gauges()
            if refs:
                log.info("spool recovered", extra={"fields": {
                    "batches": len(refs), "records": sum(r.records for r in refs),
                    "bytes": sum(self._sizes.values())}})
            return refs

    def _scan(self, seg: int) -> list[SpoolRef]:
        path = self._path(seg)
        data = path.read_bytes()
        hlen = len(MAGIC) + 1 + data[len(MAGIC)] if len(data) > len(MAGIC) else 0
        if not data.startswith(MAGIC) or hlen > len(data):
            # A crash while a new segment's header was written: it holds no frames.
            log.warning("spool segment has no valid header, removing it",
                        extra={"fields": {"segment": path.name}})
            self.metrics.inc("shipper_spool_torn_frames_total")
            path.unlink()
            return []
        foreign = data[:hlen] != self._header
        start = hlen
        if seg == self._ckpt[0]:
            start = max(start, self._ckpt[1])
        refs: list[SpoolRef] = []
        off = start
        while off < len(data):
            if off + _FRAME.size > len(data):
                break
            length, crc = _FRAME.unpack_from(data, off)
            end = off + _FRAME.size + length
            if end > len(data) or zlib.crc32(memoryview(data)[off + _FRAME.size:end]) != crc:
                break
            refs.append(SpoolRef(seg, off, end, _records_in(memoryview(data)[off + 8:end])))
            off = end
        if off < len(data):
            log.warning("spool segment has a torn or corrupt tail, cutting it off",
                        extra={"fields": {"segment": path.name, "offset": off,
                                          "bytes_cut": len(data) - off}})
            self.metrics.inc("shipper_spool_torn_frames_total")
            with open(path, "r+b") as f:
                f.truncate(max(off, hlen))
                os.fsync(f.fileno())
            data = data[:max(off, hlen)]
        if foreign:
            n = sum(r.records for r in refs)
            aside = self.dir / "incompatible"
            aside.mkdir(exist_ok=True)
            os.replace(path, aside / path.name)
            self.metrics.inc("shipper_records_dropped_total", "spool_incompatible", n=n)
            log.error("spool segment was written for another sink; moved aside, not replayed",
                      extra={"fields": {"segment": path.name, "records": n,
                                        "moved_to": str(aside)}})
            return []
        if not refs:
            self._sizes[seg] = len(data)
            self._unlink(seg)  # fully confirmed (or empty) segment
            return []
        self._sizes[seg] = len(data)
        self._pending[seg] = [len(refs), sum(r.records for r in refs)]
        return refs

    # --- writing ----------------------------------------------------------------------

    def size_bytes(self) -> int:
        """Bytes of segment files on disk."""
        return sum(self._sizes.values())

    def fits(self, frame_len: int) -> bool:
        """Whether a frame this large could ever fit (an empty spool)."""
        return frame_len + len(self._header) <= self.max_bytes

    def has_room(self, frame_len: int) -> bool:
        """Whether a frame this large fits now under ``max_bytes``."""
        with self._lock:
            extra = frame_len
            if self._writer is None or self._sizes.get(self._writer_seg, 0) >= self.segment_bytes:
                extra += len(self._header)
            return sum(self._sizes.values()) + extra <= self.max_bytes

    def append(self, frame: bytes, records: int) -> SpoolRef:
        """Write one frame (and fsync it if configured); OSError if the disk refused it.

        On a failed write the segment is cut back to its previous size.
        """
        with self._lock:
            if not self._recovered:
                raise RuntimeError("Spool.recover() must run before append()")
            if self._writer is None or self._sizes[self._writer_seg] >= self.segment_bytes:
                self._rotate()
            assert self._writer is not None
            seg, fd = self._writer_seg, self._writer
            off = self._sizes[seg]
            try:
                view = memoryview(frame)
                while view:
                    view = view[os.write(fd, view):]
                if self.fsync:
                    os.fdatasync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, off)
                raise
            end = off + len(frame)
            self._sizes[seg] = end
            p = self._pending.setdefault(seg, [0, 0])
            p[0] += 1
            p[1] += records
            self.metrics.inc("shipper_spool_batches_total", "spooled")
            self.metrics.inc("shipper_spool_records_total", "spooled", n=records)
            self._gauges()
            return SpoolRef(seg, off, end, records)

    def _rotate(self) -> None:
        if self._writer is not None:
            os.close(self._writer)
            self._writer = None
            self._gc()
        seg = self._next_seg
        self._next_seg += 1
        fd = os.open(self._path(seg), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            os.write(fd, self._header)
            if self.fsync:
                os.fsync(fd)
                self._fsync_dir()
        except OSError:
            os.close(fd)
            self._path(seg).unlink(missing_ok=True)
            raise
        self._writer, self._writer_seg = fd, seg
        self._sizes[seg] = len(self._header)

    # --- reading and confirming -------------------------------------------------------

    def read(self, ref: SpoolRef) -> Batch | None:
        """Read a spooled batch back; None if its segment was dropped meanwhile
        (``drop_segment``). Raises ValueError if the frame cannot be read or is corrupt."""
        with self._lock:
            if ref.seg not in self._sizes:
                return None
            try:
                if self._read_fd is None or self._read_fd[0] != ref.seg:
                    self._close_reader()
                    self._read_fd = (ref.seg, os.open(self._path(ref.seg), os.O_RDONLY))
                data = os.pread(self._read_fd[1], ref.end - ref.off, ref.off)
            except OSError as exc:
                raise ValueError(f"spooled batch at {ref.seg}:{ref.off} cannot be read: "
                                 f"{exc.strerror or exc}") from exc
            length, crc = _FRAME.unpack_from(data, 0) if len(data) >= 8 else (-1, 0)
            payload = memoryview(data)[_FRAME.size:]
            if length != len(payload) or zlib.crc32(payload) != crc:
                raise ValueError(f"spooled batch at {ref.seg}:{ref.off} is corrupt")
            try:
                batch = decode_payload(payload)
            except struct.error as exc:
                raise ValueError(f"spooled batch at {ref.seg}:{ref.off} is corrupt") from exc
            self.metrics.inc("shipper_spool_batches_total", "replayed")
            self.metrics.inc("shipper_spool_records_total", "replayed", n=len(batch))
            return batch

    def commit(self, ref: SpoolRef) -> None:
        """The batch at ``ref`` is done (confirmed, or dropped and counted): forget it."""
        with self._lock:
            p = self._pending.get(ref.seg)
            if p is not None:
                p[0] -= 1
                p[1] -= ref.records
                self.metrics.inc("shipper_spool_batches_total", "removed")
                self.metrics.inc("shipper_spool_records_total", "removed", n=ref.records)
            if (ref.seg, ref.end) > self._ckpt:
                self._ckpt = (ref.seg, ref.end)
                self._write_ckpt()
            self._gc()
            self._gauges()

    def droppable_segment(self) -> int | None:
        """The oldest segment that ``drop_segment`` may remove (sealing the current one
        if it is the only one holding data); None if there is nothing to drop."""
        with self._lock:
            sealed = [s for s in sorted(self._sizes)
                      if s != self._writer_seg or self._writer is None]
            if sealed:
                return sealed[0]
            if self._writer is not None and self._pending.get(self._writer_seg, [0])[0] > 0:
                os.close(self._writer)  # seal it: the next append starts a new segment
                self._writer = None
                return self._writer_seg
            return None

    def drop_segment(self, seg: int) -> None:
        """Delete a sealed segment whether or not it was confirmed (spool full, drop_oldest).

        The caller counts the dropped records; the checkpoint moves past the segment.
        """
        with self._lock:
            if seg == self._writer_seg and self._writer is not None:
                raise ValueError("cannot drop the segment being written")
            p = self._pending.get(seg, [0, 0])
            self.metrics.inc("shipper_spool_batches_total", "removed", n=p[0])
            self.metrics.inc("shipper_spool_records_total", "removed", n=p[1])
            if (seg + 1, 0) > self._ckpt:
                self._ckpt = (seg + 1, 0)
                self._write_ckpt()
            self._unlink(seg)
            self._gauges()

    def pending(self) -> tuple[int, int]:
        """(batches, records) spooled and not yet committed."""
        with self._lock:
            return (sum(p[0] for p in self._pending.values()),
                    sum(p[1] for p in self._pending.values()))

    def close(self) -> None:
        """Close files; the checkpoint is fsynced so a clean stop replays nothing confirmed."""
        with self._lock:
            self._close_reader()
            if self._writer is not None:
                if self.fsync:
                    with contextlib.suppress(OSError):
                        os.fsync(self._writer)
                os.close(self._writer)
                self._writer = None
            self._gc()
            if self._ckpt_fd is not None:
                with contextlib.suppress(OSError):
                    os.fsync(self._ckpt_fd)
                os.close(self._ckpt_fd)
                self._ckpt_fd = None

    # --- internals (lock held) --------------------------------------------------------

    def _gc(self) -> None:
        """Delete sealed segments entirely before the checkpoint."""
        cseg, coff = self._ckpt
        for seg in sorted(self._sizes):
            if seg == self._writer_seg and self._writer is not None:
                break
            if seg < cseg or (seg == cseg and coff >= self._sizes[seg]):
                self._unlink(seg)
            else:
                break

    def _unlink(self, seg: int) -> None:
        if self._read_fd is not None and self._read_fd[0] == seg:
            self._close_reader()
        self._path(seg).unlink(missing_ok=True)
        self._sizes.pop(seg, None)
        self._pending.pop(seg, None)

    def _close_reader(self) -> None:
        if self._read_fd is not None:
            os.close(self._read_fd[1])
            self._read_fd = None

    def _path(self, seg: int) -> Path:
        return self.dir / f"{seg:020d}.seg"

    def _read_ckpt(self) -> tuple[int, int]:
        assert self._ckpt_fd is not None
        data = os.pread(self._ckpt_fd, _CKPT.size + 4, 0)
        if len(data) != _CKPT.size + 4:
            return (0, 0)
        body, crc = data[:_CKPT.size], struct.unpack("<I", data[_CKPT.size:])[0]
        if zlib.crc32(body) != crc:
            log.warning("spool checkpoint is torn; replaying from the oldest segment")
            return (0, 0)
        seg, off = _CKPT.unpack(body)
        return (int(seg), int(off))

    def _write_ckpt(self) -> None:
        if self._ckpt_fd is None:
            return
        body = _CKPT.pack(*self._ckpt)
        os.pwrite(self._ckpt_fd, body + struct.pack("<I", zlib.crc32(body)), 0)

    def _fsync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _gauges(self) -> None:
        self.metrics.set("shipper_spool_bytes", sum(self._sizes.values()))
        self.metrics.set("shipper_spool_pending_batches", sum(p[0] for p in self._pending.values()))
        self.metrics.set("shipper_spool_pending_records", sum(p[1] for p in self._pending.values()))


def open_spool(cfg: SpoolConfig, sink_name: str, metrics: Metrics) -> Spool | None:
    """The configured spool for ``sink_name``, or None when disabled (not yet recovered)."""
    if not cfg.enabled:
        return None
    return Spool(cfg.dir, sink_name=sink_name, metrics=metrics, max_bytes=cfg.max_bytes,
                 segment_bytes=cfg.segment_bytes, full_policy=cfg.full_policy, fsync=cfg.fsync)
