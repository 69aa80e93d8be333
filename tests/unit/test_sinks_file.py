"""Tests for shipper.sinks.file and shipper.sinks.stdout: NDJSON outputs."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from shipper.errors import SinkError
from shipper.sinks import file as file_mod
from shipper.sinks.base import Batch
from shipper.sinks.file import FileSink
from shipper.sinks.stdout import StdoutSink, encode_json


def record(n: int, pad: int = 0) -> dict[str, Any]:
    """A small record numbered ``n`` (``pad`` adds bytes)."""
    return {"event": {"id": f"node:{n}:new:{n}"}, "n": n, "pad": "x" * pad}


def batch(*ns: int, pad: int = 0, seq: int = 1) -> Batch:
    """A batch of encoded records."""
    entries = [encode_json(record(n, pad), n) for n in ns]
    return Batch(seq=seq, entries=entries, times=list(ns), nbytes=sum(map(len, entries)))


def lines(path: Path) -> list[dict[str, Any]]:
    """Decoded NDJSON lines of a file."""
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


def fail_with(err: int) -> Any:
    """A replacement for os.write/os.open that raises OSError(err)."""

    def fail(*_a: Any, **_k: Any) -> Any:
        raise OSError(err, os.strerror(err))

    return fail


class TestEncode:
    def test_one_line_per_record(self) -> None:
        """encode_json yields one JSON document followed by a newline, no other newline."""
        data = encode_json({"a": "line\nbreak", "b": [1, 2]}, 0)
        assert data.endswith(b"\n")
        assert data.count(b"\n") == 1
        assert orjson.loads(data) == {"a": "line\nbreak", "b": [1, 2]}

    def test_sinks_use_json_encoding(self) -> None:
        """Both sinks encode with the NDJSON encoder and have their names."""
        assert FileSink.encode is StdoutSink.encode
        assert FileSink.name == "file"
        assert StdoutSink.name == "stdout"


class TestFileSink:
    def test_writes_ndjson(self, tmp_path: Path) -> None:
        """Delivered batches end up as NDJSON lines, in order."""
        p = tmp_path / "flows.json"
        sink = FileSink(p, max_bytes=1 << 20, keep=2, fsync=False)
        sink.deliver(batch(1, 2))
        sink.deliver(batch(3))
        sink.close()
        assert [x["n"] for x in lines(p)] == [1, 2, 3]

    def test_creates_missing_directories(self, tmp_path: Path) -> None:
        """The file's parent directories are created."""
        p = tmp_path / "a" / "b" / "flows.json"
        sink = FileSink(p, max_bytes=1 << 20, keep=1, fsync=False)
        sink.deliver(batch(1))
        sink.close()
        assert lines(p)[0]["n"] == 1

    def test_appends_across_reopen(self, tmp_path: Path) -> None:
        """A new sink on an existing file appends rather than truncating."""
        p = tmp_path / "flows.json"
        s1 = FileSink(p, max_bytes=1 << 20, keep=1, fsync=False)
        s1.deliver(batch(1, 2))
        s1.close()
        s2 = FileSink(p, max_bytes=1 << 20, keep=1, fsync=False)
        s2.deliver(batch(3))
        s2.close()
        assert [x["n"] for x in lines(p)] == [1, 2, 3]

    def test_existing_size_counts_toward_rotation(self, tmp_path: Path) -> None:
        """After reopening, the existing file's size counts toward max_bytes."""
        p = tmp_path / "flows.json"
        p.write_bytes(b"x" * 900 + b"\n")
        sink = FileSink(p, max_bytes=1000, keep=1, fsync=False)
        sink.deliver(batch(1, pad=200))
        sink.close()
        assert (tmp_path / "flows.json.1").read_bytes() == b"x" * 900 + b"\n"
        assert [x["n"] for x in lines(p)] == [1]

    def test_rotation_keeps_n_files(self, tmp_path: Path) -> None:
        """Rotation shifts path -> path.1 -> ... -> path.N and deletes the oldest."""
        p = tmp_path / "flows.json"
        one = len(batch(0, pad=300).entries[0])
        sink = FileSink(p, max_bytes=one + 10, keep=3, fsync=False)  # one batch per file
        for n in range(6):
            sink.deliver(batch(n, pad=300))
        sink.close()
        names = sorted(x.name for x in tmp_path.iterdir())
        assert names == ["flows.json", "flows.json.1", "flows.json.2", "flows.json.3"]
        assert [x["n"] for x in lines(p)] == [5]
        assert [x["n"] for x in lines(tmp_path / "flows.json.1")] == [4]
        assert [x["n"] for x in lines(tmp_path / "flows.json.2")] == [3]
        assert [x["n"] for x in lines(tmp_path / "flows.json.3")] == [2]

    def test_batch_never_split_across_files(self, tmp_path: Path) -> None:
        """Rotation happens before a batch, so each batch is entirely in one file."""
        p = tmp_path / "flows.json"
        sink = FileSink(p, max_bytes=1024, keep=10, fsync=False)
        for b in range(10):
            sink.deliver(batch(*range(b * 3, b * 3 + 3), pad=100, seq=b))
        sink.close()
        rotated = sorted(tmp_path.glob("flows.json.*"), key=lambda x: int(x.suffix.lstrip(".")))
        files = [p, *rotated]
        seen: list[int] = []
        for f in reversed(files):
            ns = [x["n"] for x in lines(f)]
            assert len(ns) % 3 == 0
            for i in range(0, len(ns), 3):
                assert ns[i:i + 3] == list(range(ns[i], ns[i] + 3))
            assert f.stat().st_size <= 1024
            seen += ns
        assert seen == list(range(30))

    def test_oversize_batch_into_empty_file_is_written(self, tmp_path: Path) -> None:
        """A batch larger than max_bytes still goes into an empty file, unsplit."""
        p = tmp_path / "flows.json"
        sink = FileSink(p, max_bytes=1024, keep=1, fsync=False)
        sink.deliver(batch(1, pad=5000))
        sink.close()
        assert [x["n"] for x in lines(p)] == [1]
        assert not (tmp_path / "flows.json.1").exists()

    def test_keep_zero_discards_on_rotation(self, tmp_path: Path) -> None:
        """With keep 0 the full file is deleted at rotation; no numbered files appear."""
        p = tmp_path / "flows.json"
        one = len(batch(0, pad=300).entries[0])
        sink = FileSink(p, max_bytes=one + 10, keep=0, fsync=False)
        for n in range(3):
            sink.deliver(batch(n, pad=300))
        sink.close()
        assert sorted(x.name for x in tmp_path.iterdir()) == ["flows.json"]
        assert [x["n"] for x in lines(p)] == [2]

    def test_fsync_flag(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """With fsync on every delivered batch is fsynced; with it off none is (until close)."""
        calls: list[int] = []
        real = os.fsync

        def fsync(fd: int) -> None:
            calls.append(fd)
            real(fd)

        monkeypatch.setattr(file_mod.os, "fsync", fsync)
        on = FileSink(tmp_path / "on.json", max_bytes=1 << 20, keep=1, fsync=True)
        on.deliver(batch(1))
        on.deliver(batch(2))
        assert len(calls) == 2
        off = FileSink(tmp_path / "off.json", max_bytes=1 << 20, keep=1, fsync=False)
        off.deliver(batch(1))
        assert len(calls) == 2
        off.close()
        assert len(calls) == 3  # close fsyncs
        on.close()

    def test_close_is_idempotent(self, tmp_path: Path) -> None:
        """Closing twice is harmless."""
        sink = FileSink(tmp_path / "f.json", max_bytes=1 << 20, keep=1, fsync=False)
        sink.close()
        sink.close()

    def test_directory_cannot_be_created(self, tmp_path: Path) -> None:
        """A parent path that is a file: SinkError at construction, not retriable."""
        blocker = tmp_path / "file"
        blocker.write_text("x")
        with pytest.raises(SinkError) as ei:
            FileSink(blocker / "sub" / "flows.json", max_bytes=1 << 20, keep=1, fsync=False)
        assert ei.value.retriable is False
        assert "cannot create directory" in str(ei.value)

    @pytest.mark.parametrize(
        ("err", "retriable"),
        [(errno.EACCES, False), (errno.EROFS, False), (errno.ENOSPC, True), (errno.EIO, True)],
    )
    def test_open_failure_verdict(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  err: int, retriable: bool) -> None:
        """Permission denied / read-only file system are final; other open errors retriable."""
        monkeypatch.setattr(file_mod.os, "open", fail_with(err))
        with pytest.raises(SinkError) as ei:
            FileSink(tmp_path / "flows.json", max_bytes=1 << 20, keep=1, fsync=False)
        assert ei.value.retriable is retriable
        assert "cannot open" in str(ei.value)
        assert str(tmp_path / "flows.json") in str(ei.value)

    def test_path_is_a_directory(self, tmp_path: Path) -> None:
        """A path that is a directory cannot be opened (EISDIR, retriable per the code)."""
        (tmp_path / "flows.json").mkdir()
        with pytest.raises(SinkError) as ei:
            FileSink(tmp_path / "flows.json", max_bytes=1 << 20, keep=1, fsync=False)
        assert ei.value.retriable is True

    @pytest.mark.parametrize(
        ("err", "retriable"), [(errno.ENOSPC, True), (errno.EROFS, False), (errno.EACCES, False)]
    )
    def test_write_failure_verdict(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   err: int, retriable: bool) -> None:
        """A failing write raises SinkError with the verdict of its errno."""
        sink = FileSink(tmp_path / "flows.json", max_bytes=1 << 20, keep=1, fsync=False)
        monkeypatch.setattr(file_mod.os, "write", fail_with(err))
        with pytest.raises(SinkError) as ei:
            sink.deliver(batch(1))
        assert ei.value.retriable is retriable
        assert "write to" in str(ei.value)

    @staticmethod
    def _torn_then_retry(p: Path, monkeypatch: pytest.MonkeyPatch, failing_calls: int) -> None:
        """Deliver 1; then deliver 2 with a partial write followed by ``failing_calls`` failing
        writes; then retry 2 with working writes."""
        sink = FileSink(p, max_bytes=1 << 20, keep=1, fsync=False)
        sink.deliver(batch(1))
        real_write = os.write
        state = {"calls": 0}

        def torn_write(fd: int, data: Any) -> int:
            state["calls"] += 1
            if state["calls"] == 1:
                return real_write(fd, bytes(data)[:7])  # a partial write...
            if state["calls"] <= 1 + failing_calls:
                raise OSError(errno.ENOSPC, "No space left on device")  # ...then failure
            return real_write(fd, data)

        monkeypatch.setattr(file_mod.os, "write", torn_write)
        with pytest.raises(SinkError) as ei:
            sink.deliver(batch(2))
        assert ei.value.retriable is True
        monkeypatch.setattr(file_mod.os, "write", real_write)
        sink.deliver(batch(2))
        sink.close()

    def test_retry_after_transient_torn_write(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """After a torn write the retried batch starts on a new line and is written whole."""
        p = tmp_path / "flows.json"
        self._torn_then_retry(p, monkeypatch, failing_calls=1)
        raw = p.read_bytes().splitlines()
        assert raw[0] == encode_json(record(1), 1).rstrip(b"\n")
        assert raw[-1] == encode_json(record(2), 2).rstrip(b"\n")

    def test_retry_after_persistent_torn_write(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Even when the disk stays full past the error, the retried batch is on its own line."""
        p = tmp_path / "flows.json"
        self._torn_then_retry(p, monkeypatch, failing_calls=2)
        raw = p.read_bytes().splitlines()
        assert raw[-1] == encode_json(record(2), 2).rstrip(b"\n")

    def test_fsync_failure_is_sink_error(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An fsync failure is reported as a (retriable) SinkError."""
        sink = FileSink(tmp_path / "flows.json", max_bytes=1 << 20, keep=1, fsync=True)
        monkeypatch.setattr(file_mod.os, "fsync", fail_with(errno.EIO))
        with pytest.raises(SinkError) as ei:
            sink.deliver(batch(1))
        assert ei.value.retriable is True


class _BrokenPipe(io.BytesIO):
    def write(self, _b: Any) -> int:
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")


class _Full(io.BytesIO):
    def write(self, _b: Any) -> int:
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")


class _FlushFails(io.BytesIO):
    def flush(self) -> None:
        raise OSError(errno.EIO, "Input/output error")


class TestStdoutSink:
    def test_writes_batch_as_ndjson(self) -> None:
        """Each batch is written as NDJSON lines."""
        out = io.BytesIO()
        sink = StdoutSink(out)
        sink.deliver(batch(1, 2))
        sink.deliver(batch(3))
        sink.close()
        assert [orjson.loads(x)["n"] for x in out.getvalue().splitlines()] == [1, 2, 3]

    def test_broken_pipe_is_final(self) -> None:
        """A closed pipe (reader gone) is a non-retriable SinkError."""
        with pytest.raises(SinkError) as ei:
            StdoutSink(_BrokenPipe()).deliver(batch(1))
        assert ei.value.retriable is False
        assert "broken pipe" in str(ei.value)

    def test_other_os_errors_are_retriable(self) -> None:
        """Other OS errors on write or flush are retriable SinkErrors naming the error."""
        with pytest.raises(SinkError) as ei:
            StdoutSink(_Full()).deliver(batch(1))
        assert ei.value.retriable is True
        assert os.strerror(errno.EAGAIN) in str(ei.value)
        with pytest.raises(SinkError) as ei2:
            StdoutSink(_FlushFails()).deliver(batch(1))
        assert ei2.value.retriable is True

    def test_close_swallows_flush_errors(self) -> None:
        """close() never raises, even on a failing or closed stream."""
        StdoutSink(_FlushFails()).close()
        closed = io.BytesIO()
        closed.close()
        StdoutSink(closed).close()

    def test_default_stream_is_stdout_buffer(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without a stream the sink writes to sys.stdout's binary buffer."""
        import sys

        buf = io.BytesIO()
        fake = io.TextIOWrapper(buf)
        monkeypatch.setattr(sys, "stdout", fake)
        StdoutSink().deliver(batch(7))
        assert orjson.loads(buf.getvalue())["n"] == 7

    def test_closed_stream_is_final_sink_error(self) -> None:
        """Writing to a closed stream is a non-retriable SinkError."""
        closed = io.BytesIO()
        sink = StdoutSink(closed)
        closed.close()
        with pytest.raises(SinkError) as ei:
            sink.deliver(batch(1))
        assert ei.value.retriable is False


class TestNonRegularFiles:
    """Devices and FIFOs are written to, never rotated (renamed) or truncated."""

    def test_device_is_never_rotated(self, tmp_path: Path) -> None:
        """Writing past max_bytes to a character device leaves the device in place."""
        import stat as stat_mod

        from shipper.sinks.base import Batch
        from shipper.sinks.file import FileSink

        # A private null device node, so that a failing test cannot harm /dev/null.
        dev = str(tmp_path / "null")
        os.mknod(dev, stat_mod.S_IFCHR | 0o666, os.makedev(1, 3))
        before = os.stat(dev)
        sink = FileSink(Path(dev), max_bytes=1024, keep=2, fsync=False)
        try:
            for i in range(5):
                sink.deliver(Batch(seq=i, entries=[b"x" * 900 + b"\n"]))
        finally:
            sink.close()
        after = os.stat(dev)
        assert stat_mod.S_ISCHR(after.st_mode)
        assert (after.st_rdev, after.st_ino) == (before.st_rdev, before.st_ino)
        assert not Path(dev + ".1").exists()

    def test_fifo_is_written_not_rotated(self, tmp_path: Path) -> None:
        """A named pipe receives the lines and is not renamed."""
        import threading

        from shipper.sinks.base import Batch
        from shipper.sinks.file import FileSink

        fifo = tmp_path / "pipe"
        os.mkfifo(fifo)
        got: list[bytes] = []

        def reader() -> None:
            with open(fifo, "rb") as f:
                got.append(f.read())

        t = threading.Thread(target=reader)
        t.start()
        sink = FileSink(fifo, max_bytes=1024, keep=2, fsync=False)
        for i in range(3):
            sink.deliver(Batch(seq=i, entries=[b"y" * 700 + b"\n"]))
        sink.close()
        t.join(10)
        assert got and got[0].count(b"\n") == 3
        assert fifo.exists() and not (tmp_path / "pipe.1").exists()
