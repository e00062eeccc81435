"""A request's large inputs (images as data URIs, long chats) handed to Triton through a system
shared-memory region instead of inside the gRPC message.

Measured against the tiny model's server on this project's 2-core machine: a 4 MB input took
13-18 ms from the adapter's send to Triton's REQUEST_START, 1 KB 0.4-0.7 ms; a 1280x720 noise PNG
(a 3.7 MB data URI) 18-20 ms, its JPEG (1.1 MB) 3-5 ms (NOTES, twenty-ninth session). Through
the region the adapter copies the bytes once into memory Triton has mapped, and the message
carries only (region, offset, size).

Used only where Triton runs on this host (a loopback --triton-url): the region is created,
registered with Triton, and its name unlinked at once, so nothing else can open it and nothing
is left in /dev/shm if the adapter dies; Triton keeps its own mapping. Its pages are reserved up
front (posix_fallocate), so a full /dev/shm (a container's 64 MB default) shrinks or disables
the region at start instead of faulting later. A slice is freed when its request has ended in
Triton (its final response or Triton's error); a request the client left, which Triton may
still read (2.51 does not cancel an ensemble's steps), keeps its slice for QUARANTINE_S more.
Where the region is full, or Triton refuses it, the input goes in the message as before.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from multiprocessing import shared_memory

import numpy as np
import tritonclient.grpc.aio as grpcclient

log = logging.getLogger("openai_frontend")

ALIGN = 64                  # slices start on cache lines
MIN_BYTES = 64 * 1024       # smaller inputs ride in the message (a 64 KB input cost ~1 ms there)
MIN_REGION = 16 * 2**20     # below this the region is not worth having
QUARANTINE_S = 60.0


class SliceAllocator:
    """First-fit slices of [0, size): alloc -> offset or None when nothing fits; free coalesces."""

    def __init__(self, size: int):
        self.size = size
        self._free: list[list[int]] = [[0, size]]       # [offset, length], sorted, never adjacent
        self._used: dict[int, int] = {}

    @property
    def used_bytes(self) -> int:
        return sum(self._used.values())

    def alloc(self, n: int) -> int | None:
        n = max(ALIGN, -(-n // ALIGN) * ALIGN)
        for i, (off, length) in enumerate(self._free):
            if length >= n:
                if length == n:
                    del self._free[i]
                else:
                    self._free[i] = [off + n, length - n]
                self._used[off] = n
                return off
        return None

    def free(self, offset: int) -> None:
        n = self._used.pop(offset)
        i = 0
        while i < len(self._free) and self._free[i][0] < offset:
            i += 1
        self._free.insert(i, [offset, n])
        if i + 1 < len(self._free) and offset + n == self._free[i + 1][0]:      # the one after
            self._free[i][1] += self._free.pop(i + 1)[1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:     # the one before
            self._free[i - 1][1] += self._free.pop(i)[1]


def bytes_tensor_size(items) -> int:
    """Triton's serialized BYTES tensor: each element as a 4-byte little-endian length and its bytes."""
    return sum(4 + len(b) for b in items)


def write_bytes_tensor(buf: memoryview, offset: int, items) -> int:
    """Serialize `items` into buf at offset; -> the bytes written."""
    at = offset
    for b in items:
        buf[at:at + 4] = len(b).to_bytes(4, "little")
        buf[at + 4:at + 4 + len(b)] = b
        at += 4 + len(b)
    return at - offset


class ShmInputs:
    """The adapter's region and its slices (one asyncio loop uses it; no locks)."""

    def __init__(self, client: grpcclient.InferenceServerClient, size: int):
        self._client, self._want = client, size
        self._shm: shared_memory.SharedMemory | None = None
        self._alloc: SliceAllocator | None = None
        self.name: str | None = None
        self.disabled = size < MIN_REGION
        self.placed = 0         # inputs sent through the region so far (the /metrics counter reads it)
        self._lock = asyncio.Lock()

    @property
    def used_bytes(self) -> int:
        return self._alloc.used_bytes if self._alloc else 0

    async def ready(self) -> bool:
        """The region, created and registered with Triton on first use (or again after
        `invalidate`); False (and off for good) where it cannot be."""
        if self._alloc is not None or self.disabled:
            return not self.disabled
        async with self._lock:
            if self._alloc is None and not self.disabled:
                try:
                    await self._register()
                except Exception as e:          # a remote or containerised Triton, a full /dev/shm, ...
                    self.disabled = True
                    log.warning("large inputs go to Triton inside gRPC messages: no shared-memory region (%s)", e)
        return not self.disabled

    async def _register(self) -> None:
        shm, size = None, self._want
        while shm is None:
            candidate = shared_memory.SharedMemory(name=f"qwen3vl-{os.getpid()}-{uuid.uuid4().hex[:12]}",
                                                   create=True, size=size)
            try:
                os.posix_fallocate(candidate._fd, 0, size)     # the pages now, not a SIGBUS later
                shm = candidate
            except OSError:
                candidate.close()
                candidate.unlink()
                size //= 2
                if size < MIN_REGION:
                    raise OSError(f"/dev/shm has no room for a {MIN_REGION >> 20} MB region") from None
        name = f"qwen3vl_inputs_{uuid.uuid4().hex[:12]}"
        try:
            await self._client.register_system_shared_memory(name, "/" + shm.name, size)
        except BaseException:
            shm.close()             # not kept mapped here (its pages are reserved) for nothing
            raise
        finally:
            shm.unlink()            # Triton has mapped it (or refused): the name is needed no more
        self._shm, self._alloc, self.name = shm, SliceAllocator(size), name
        log.info("large inputs go to Triton through shared memory (%d MB region %s)", size >> 20, name)

    def invalidate(self) -> None:
        """Triton lost the region (it restarted): the next request registers a new one. Slices of
        the old one are dropped with it (their requests failed with Triton)."""
        if self._shm is not None:
            old = self._shm
            self._shm, self._alloc, self.name = None, None, None
            try:
                old.close()
            except BufferError:     # a view still open: the mapping goes with the object
                pass

    def place(self, name: str, arr: np.ndarray):
        """An InferInput for a BYTES array through the region, and its slice's release (a callable
        taking `now`: False keeps the slice QUARANTINE_S longer); None where it goes in the message."""
        if self._alloc is None or arr.dtype != np.object_:
            return None
        items = [b if isinstance(b, bytes) else str(b).encode() for b in arr.reshape(-1)]
        n = bytes_tensor_size(items)
        if n < MIN_BYTES:
            return None
        offset = self._alloc.alloc(n)
        if offset is None:
            return None
        write_bytes_tensor(self._shm.buf, offset, items)
        t = grpcclient.InferInput(name, list(arr.shape), "BYTES")
        t.set_shared_memory(self.name, n, offset)
        self.placed += 1
        alloc = self._alloc

        def release(now: bool = True) -> None:
            if alloc is not self._alloc:        # the region was replaced: nothing to give back
                return
            if now:
                alloc.free(offset)
            else:
                asyncio.get_running_loop().call_later(QUARANTINE_S, release)

        return t, release

    async def close(self) -> None:
        if self._shm is not None and self.name:
            try:
                await self._client.unregister_system_shared_memory(self.name)
            except Exception:
                pass
        self.invalidate()


def is_region_error(message: str) -> bool:
    """Triton's answer to a request naming a region it does not have (it restarted)."""
    return "shared memory region" in message.lower()
