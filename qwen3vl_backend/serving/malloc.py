"""glibc's malloc, told to keep what a request frees for the next one.

A 1280x720 PNG request moves megabytes through a few large buffers: the adapter reads the body,
parses it and decodes the base64 data URI (~21 MB of buffers); the preprocess stub inflates and
unfilters the image (~11 MB). glibc serves such buffers from fresh pages and returns them when
freed, so each request faults them in again and the kernel zeroes them. Counted on the tiny model
served on a 2-core VM, the adapter faulted ~5,500 pages per request and ~5 with this; a PNG decode
on a main thread faulted ~2,670 and took 15-23 ms, against none and 8.6-9.5 ms with this
(tests/test_malloc.py counts them). The preprocess stub's decodes, run on its media threads, had
already reused their pages there after a request or two. Processes that handle megabytes a
request (the preprocess stub, the adapter) call `keep_freed_memory` once at start.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1       # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 64 << 20) -> bool:
    """Allocations under `mmap_threshold` bytes come from malloc's heaps instead of their own
    mappings, and a heap keeps up to `trim_threshold` free bytes at its top instead of handing
    them back: a request's buffers reuse the last one's pages. The cost is that many bytes of
    resident memory per arena held between requests. False where the C library has no mallopt
    (not glibc) or refuses the values; nothing changes then."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
