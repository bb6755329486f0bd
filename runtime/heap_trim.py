"""Give the heap's free pages back to the system after a weight update (glibc's `malloc_trim`).

An update allocates and frees hundreds of megabytes (a payload's text and bytes, a checkpoint's buffers,
the finiteness check's temporaries) while requests keep allocating around them. glibc returns a freed
block to the system at once only when it was mapped on its own (big blocks) or sits at the top of the heap;
freed memory in the middle of a heap, or of a thread's arena, stays resident, and under load the resident
size creeps up update after update. `malloc_trim(0)` releases every free page of every arena. It costs a
walk over the free lists (about a millisecond here) and is a no-op where there is no glibc.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import time

logger = logging.getLogger(__name__)


def _load_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _load_trim()


def release_free_heap() -> bool:
    """True when some memory went back to the system."""
    if _MALLOC_TRIM is None:
        return False
    start = time.perf_counter()
    released = bool(_MALLOC_TRIM(0))
    logger.debug("malloc_trim: %s in %.1f ms", "released memory" if released else "nothing to release",
                 1e3 * (time.perf_counter() - start))
    return released
