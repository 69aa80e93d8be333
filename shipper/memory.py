"""glibc allocator settings for the event path.

Every event allocates a record (small objects: pymalloc) and an encoded line
of about a kilobyte (glibc malloc); a closed batch frees a thousand of them at
once on another thread. With glibc's defaults the heap top is trimmed and
re-grown constantly and large batch buffers are mmap-ed and unmapped per
batch, which costs page faults: measured here, record building plus encoding
went from about 7 us to about 14 us per event. Raising the trim threshold
and top pad and keeping batch-sized buffers on the heap avoids that churn,
for a few tens of megabytes of retained heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("shipper.memory")

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3


def tune_malloc(
    *, trim_threshold: int = 128 << 20, top_pad: int = 64 << 20, mmap_threshold: int = 8 << 20
) -> bool:
    """Apply the settings through ``mallopt``; False (and a debug log) if not glibc."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.debug("mallopt not available; allocator left at its defaults")
        return False
    ok = True
    for param, value in (
        (M_MMAP_THRESHOLD, mmap_threshold),
        (M_TRIM_THRESHOLD, trim_threshold),
        (M_TOP_PAD, top_pad),
    ):
        ok = bool(mallopt(param, value)) and ok
    return ok
