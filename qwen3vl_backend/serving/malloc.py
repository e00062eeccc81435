"""glibc's malloc told to keep the pages a request frees, for the preprocess stub.

A 1280x720 PNG's decode (processing/media.decode_image_array) allocates ~11 MB in a few ~2.8 MB
buffers: the zlib stream, the scanlines, their stored copy, the pixels. glibc gives each its own
mapping or trims the heap top after it is freed, so the next decode faults the pages in and
zeroes them again. Measured (thirty-fifth session's NOTES): on this project's 2-core VM a decode
on a pool thread faulted ~2,000 pages every time and took 13.4-15.5 ms, 8.4-10.3 with the pages
kept; the served preprocess stub faulted 0-2,700 pages a PNG request. On the H200 host the stub's
PNG decode took 13.5-19 ms where benchmarks.preprocess took ~10.7.

`keep_freed_memory` raises the size above which an allocation gets its own mapping and the free
bytes a heap keeps at its top, and caps the heaps (arenas) the process makes. The cost: each
arena that served a large request holds up to `trim_threshold` bytes of freed memory between
requests, and the media threads share two arenas' locks (a few large allocations a decode). QWEN3VL_KEEP_FREED_MEMORY=0 leaves glibc
as it is (for comparison, or a host short of memory).
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1       # mallopt's parameter numbers (glibc's malloc.h)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
ENV = "QWEN3VL_KEEP_FREED_MEMORY"


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 64 << 20, arenas: int = 2) -> bool:
    """Allocations below `mmap_threshold` bytes come from malloc's heaps, and a heap keeps up to
    `trim_threshold` free bytes at its top, so one request's buffers reuse the last one's pages.
    At most `arenas` heaps are made from here on (glibc makes one a thread, up to 8 a core): the
    media pool's threads then share warm heaps, where each new thread's own heap would fault its
    first decode's pages in (the served tiny model: 600-2,200 pages for each of its first requests
    with a heap a thread). Process-wide, once, at start, before the media threads run. False (and
    nothing changed) where the switch is off, the C library has no mallopt (not glibc), or it
    refuses a value."""
    if os.environ.get(ENV, "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) for param, value in ((M_MMAP_THRESHOLD, mmap_threshold),
                                                          (M_TRIM_THRESHOLD, trim_threshold), (M_ARENA_MAX, arenas)))
