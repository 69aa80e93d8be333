"""Disk spool: framing, ordering, commit/checkpoint, recovery after crashes, size cap."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shipper.metrics import Metrics
from shipper.sinks.base import Batch
from shipper.sinks.spool import Spool, SpoolRef, decode_payload, encode_frame


def _batch(seq: int, n: int = 3, size: int = 10) -> Batch:
    entries = [f"{seq}:{i}:".encode().ljust(size, b"x") for i in range(n)]
    return Batch(seq=seq, entries=entries, times=[seq * 1000 + i for i in range(n)],
                 nbytes=n * size)


def _spool(d: Path, m: Metrics | None = None, **kw: object) -> Spool:
    args: dict[str, object] = {"max_bytes": 1 << 20, "segment_bytes": 1 << 16, "fsync": True,
                               "sink_name": "forward"}
    args.update(kw)
    return Spool(d, metrics=m or Metrics(), **args)  # type: ignore[arg-type]


def _opened(d: Path, m: Metrics | None = None, **kw: object) -> Spool:
    s = _spool(d, m, **kw)
    s.recover()
    return s


def _append(s: Spool, b: Batch) -> SpoolRef:
    return s.append(encode_frame(b), len(b))


def _seq(s: Spool, r: SpoolRef) -> int:
    b = s.read(r)
    assert b is not None
    return b.seq


def _segments(d: Path) -> list[Path]:
    return sorted(d.glob("*.seg"))


class TestFrame:
    def test_round_trip(self) -> None:
        """A frame's payload decodes to the same entries, times and seq."""
        b = _batch(7, n=5)
        frame = encode_frame(b)
        got = decode_payload(frame[8:])
        assert (got.seq, got.entries, got.times) == (7, b.entries, b.times)

    def test_empty_entries_allowed(self) -> None:
        """Zero-length entries survive."""
        b = Batch(seq=1, entries=[b"", b"a"], times=[1, 2])
        assert decode_payload(encode_frame(b)[8:]).entries == [b"", b"a"]


class TestSpool:
    def test_append_read_commit(self, tmp_path: Path) -> None:
        """Appended batches read back intact; commit empties the spool and counts ops."""
        m = Metrics()
        s = _spool(tmp_path, m)
        assert s.recover() == []
        refs = [_append(s, _batch(i)) for i in range(3)]
        assert s.pending() == (3, 9)
        assert m.value("shipper_spool_pending_batches", ) == 3
        for i, r in enumerate(refs):
            b = s.read(r)
            assert b is not None and b.entries == _batch(i).entries
            s.commit(r)
        assert s.pending() == (0, 0)
        assert m.value("shipper_spool_batches_total", "spooled") == 3
        assert m.value("shipper_spool_records_total", "removed") == 9
        s.close()

    def test_append_before_recover_is_refused(self, tmp_path: Path) -> None:
        """recover() must run first (it decides the next segment id)."""
        with pytest.raises(RuntimeError):
            _append(_spool(tmp_path), _batch(1))

    def test_uncommitted_batches_survive_reopen_in_order(self, tmp_path: Path) -> None:
        """What was not committed is recovered, in append order, after a restart."""
        s = _opened(tmp_path, segment_bytes=4096)
        refs = [_append(s, _batch(i, size=300)) for i in range(20)]
        for r in refs[:5]:
            s.commit(r)
        # No close(): like SIGKILL, only what the kernel has.
        s2 = _spool(tmp_path, segment_bytes=4096)
        got = s2.recover()
        assert [_seq(s2, r) for r in got] == list(range(5, 20))
        assert len(_segments(tmp_path)) > 1

    def test_committed_segments_are_deleted(self, tmp_path: Path) -> None:
        """Space is freed once the checkpoint passes a sealed segment."""
        m = Metrics()
        s = _opened(tmp_path, m, segment_bytes=4096)
        refs = [_append(s, _batch(i, size=500)) for i in range(30)]
        before = len(_segments(tmp_path))
        for r in refs:
            s.commit(r)
        assert before > 3 and len(_segments(tmp_path)) == 1  # only the open segment
        assert m.value("shipper_spool_bytes") == s.size_bytes() < 4096 + 600
        s.close()
        assert _spool(tmp_path).recover() == []

    def test_torn_tail_is_cut_and_counted(self, tmp_path: Path) -> None:
        """A crash mid-append leaves a torn frame: recovery drops it, truncates, counts it."""
        s = _opened(tmp_path)
        for i in range(3):
            _append(s, _batch(i))
        seg = _segments(tmp_path)[-1]
        size = seg.stat().st_size
        os.truncate(seg, size - 7)
        m = Metrics()
        s2 = _spool(tmp_path, m)
        got = s2.recover()
        assert [_seq(s2, r) for r in got] == [0, 1]
        assert m.value("shipper_spool_torn_frames_total") == 1
        assert seg.stat().st_size < size - 7
        # The spool keeps working after the cut.
        r = _append(s2, _batch(9))
        assert _seq(s2, r) == 9

    def test_corrupt_frame_is_cut(self, tmp_path: Path) -> None:
        """A frame whose CRC does not match ends the segment's valid part."""
        s = _opened(tmp_path)
        refs = [_append(s, _batch(i)) for i in range(3)]
        seg = _segments(tmp_path)[-1]
        with open(seg, "r+b") as f:
            f.seek(refs[1].off + 12)
            f.write(b"\xff")
        s2 = _spool(tmp_path)
        assert [_seq(s2, r) for r in s2.recover()] == [0]

    def test_torn_segment_header_is_removed(self, tmp_path: Path) -> None:
        """A new segment whose header was never completed is removed at recovery."""
        s = _opened(tmp_path)
        _append(s, _batch(1))
        (tmp_path / f"{99:020d}.seg").write_bytes(b"FLSP")
        m = Metrics()
        s2 = _spool(tmp_path, m)
        assert len(s2.recover()) == 1
        assert not (tmp_path / f"{99:020d}.seg").exists()
        assert m.value("shipper_spool_torn_frames_total") == 1

    def test_torn_checkpoint_replays_everything(self, tmp_path: Path) -> None:
        """A corrupt checkpoint means replaying from the oldest segment (duplicates, no loss)."""
        s = _opened(tmp_path)
        refs = [_append(s, _batch(i)) for i in range(4)]
        s.commit(refs[0])
        s.commit(refs[1])
        (tmp_path / "checkpoint").write_bytes(b"\x00" * 5)
        assert len(_spool(tmp_path).recover()) == 4

    def test_checkpoint_survives_without_close(self, tmp_path: Path) -> None:
        """Committed batches are not replayed after a process crash (checkpoint in page cache)."""
        s = _opened(tmp_path)
        refs = [_append(s, _batch(i)) for i in range(4)]
        s.commit(refs[0])
        s2 = _spool(tmp_path)
        assert [_seq(s2, r) for r in s2.recover()] == [1, 2, 3]

    def test_size_cap(self, tmp_path: Path) -> None:
        """has_room answers against max_bytes; fits says whether a frame could ever fit."""
        s = _opened(tmp_path, max_bytes=64 * 1024, segment_bytes=4096)
        frame_len = len(encode_frame(_batch(0, n=10, size=500)))
        n = 0
        while s.has_room(frame_len):
            _append(s, _batch(n, n=10, size=500))
            n += 1
        assert 10 < n < 14
        assert s.size_bytes() <= 64 * 1024
        assert s.fits(frame_len) and not s.fits(65 * 1024)

    def test_drop_segment(self, tmp_path: Path) -> None:
        """droppable_segment names the oldest sealed segment; dropping it moves the checkpoint."""
        s = _opened(tmp_path, segment_bytes=4096)
        refs = [_append(s, _batch(i, size=500)) for i in range(12)]
        seg = s.droppable_segment()
        assert seg is not None and seg == refs[0].seg
        s.drop_segment(seg)
        assert s.read(refs[0]) is None
        left = _spool(tmp_path, segment_bytes=4096).recover()
        assert left and all(r.seg > seg for r in left)
        assert len(left) == sum(1 for r in refs if r.seg > seg)

    def test_current_segment_is_sealed_for_dropping(self, tmp_path: Path) -> None:
        """With one segment holding everything, droppable_segment seals it first."""
        s = _opened(tmp_path)
        r = _append(s, _batch(1))
        seg = s.droppable_segment()
        assert seg is not None and seg == r.seg
        s.drop_segment(seg)
        r2 = _append(s, _batch(2))
        assert r2.seg > seg

    def test_other_sinks_segments_are_set_aside(self, tmp_path: Path) -> None:
        """A spool written for another sink is moved aside and its records counted as dropped."""
        s = _opened(tmp_path, sink_name="file")
        _append(s, _batch(1))
        s.close()
        m = Metrics()
        assert _spool(tmp_path, m).recover() == []
        assert m.value("shipper_records_dropped_total", "spool_incompatible") == 3
        assert list((tmp_path / "incompatible").glob("*.seg"))

    def test_read_reports_corruption(self, tmp_path: Path) -> None:
        """A frame corrupted after it was written raises ValueError on read."""
        s = _opened(tmp_path)
        r = _append(s, _batch(1))
        with open(_segments(tmp_path)[0], "r+b") as f:
            f.seek(r.end - 1)
            f.write(b"!")
        with pytest.raises(ValueError, match="corrupt"):
            s.read(r)

    def test_bad_policy(self, tmp_path: Path) -> None:
        """An unknown full policy is refused."""
        with pytest.raises(ValueError):
            _spool(tmp_path, full_policy="drop_newest")
