"""file sink: NDJSON appended to a file, rotated by size, optional fsync.

Rotation renames ``path`` -> ``path.1`` -> ... -> ``path.N`` (``keep`` = N) and
deletes the oldest, like logrotate's default scheme, so tools tailing ``path``
by name follow it. A batch is never split across two files. A path that is not
a regular file (``/dev/stdout``, a FIFO) is never rotated.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from shipper.errors import SinkError
from shipper.sinks.base import Batch, EntryFormat
from shipper.sinks.stdout import encode_json


class FileSink:
    """Appends each batch with one write; rotates before a batch would pass ``max_bytes``."""

    name = "file"
    encode = staticmethod(encode_json)
    #: Entries are NDJSON lines: the pipeline may use the fused event encoder
    #: (``shipper.ecs_json``), which yields the same lines as ``encode``.
    entry_format: EntryFormat = "ndjson"
    #: Done when the write returned (and fsync, if configured): nobody confirms reading it.
    acknowledged = False

    def __init__(self, path: Path, *, max_bytes: int, keep: int, fsync: bool) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self.fsync = fsync
        self._fd: int | None = None
        self._size = 0
        self._torn = False  # a partial write could not be undone
        self._regular = True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SinkError(f"cannot create directory {self.path.parent}: {exc.strerror}",
                            retriable=False) from exc
        self._open()

    def _open(self) -> None:
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
            st = os.fstat(self._fd)
            self._size = st.st_size
            # Rotation (renaming) is only for regular files: a device, FIFO or
            # socket (/dev/stdout, a named pipe to a collector) is written as is.
            self._regular = stat.S_ISREG(st.st_mode)
        except OSError as exc:
            self._fd = None
            raise SinkError(f"cannot open {self.path}: {exc.strerror}",
                            retriable=exc.errno not in (13, 30)) from exc

    def _rotate(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.keep == 0:
            os.unlink(self.path)
        else:
            for i in range(self.keep, 0, -1):
                src = self.path if i == 1 else self.path.with_name(f"{self.path.name}.{i - 1}")
                dst = self.path.with_name(f"{self.path.name}.{i}")
                if src.exists():
                    os.replace(src, dst)
        self._open()

    def deliver(self, batch: Batch) -> None:
        """Append the batch (one write), fsync if configured.

        A failed write is undone by truncating the file back to its size
        before the batch, so the retry never appends to a torn line; if even
        that fails, the next successful write starts on a fresh line.
        """
        data = b"".join(batch.entries)
        try:
            if self._fd is None:
                self._open()
            if self._regular and self._size and self._size + len(data) > self.max_bytes:
                self._rotate()
            assert self._fd is not None
            if self._torn:
                data = b"\n" + data
            before = self._size
            try:
                view = memoryview(data)
                while view:
                    n = os.write(self._fd, view)
                    view = view[n:]
                    self._size += n
            except OSError:
                self._undo(before)
                raise
            self._torn = False
            if self.fsync:
                os.fsync(self._fd)
        except OSError as exc:
            raise SinkError(f"write to {self.path} failed: {exc.strerror}",
                            retriable=exc.errno not in (13, 30)) from exc

    def _undo(self, size: int) -> None:
        """Drop a partial batch from the end of the file (or remember it is torn)."""
        if self._size == size or self._fd is None:
            return
        if not self._regular:
            self._torn = True
            return
        try:
            os.ftruncate(self._fd, size)
            self._size = size
        except OSError:
            self._torn = True

    def abort(self) -> None:
        """Nothing to interrupt: a local write or fsync waits on no peer."""

    def close(self) -> None:
        """fsync and close the file."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
