"""glibc's malloc, told to keep what a request frees for the next one.

A 1280x720 PNG's decode allocates ~11 MB in a few buffers of ~2.8 MB (the zlib stream, the
scanlines, their stored copy, the pixels). glibc serves each from fresh pages and returns them
when freed, so every decode faults ~2,700 pages in again and zeroes them: on a 2-core VM the
decode took 15-20 ms that way and 8 ms with the pages kept (tests/test_malloc.py counts the
faults). Processes that handle megabytes a request (the preprocess stub, the adapter) call
`keep_freed_memory` once at start.
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
