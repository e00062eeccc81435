"""openai_frontend/shm_inputs.py: the slices of the adapter's shared-memory region, the BYTES
tensor it writes there, and which Triton URLs it is used for. (Served through a real Triton:
test_server.py's large-image tests.)"""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from openai_frontend.shm_inputs import ALIGN, MIN_BYTES, ShmInputs, SliceAllocator, bytes_tensor_size, write_bytes_tensor
from openai_frontend.triton_client import is_local


def test_slices_never_overlap_and_all_come_back():
    """Random allocations and frees (first fit): live slices are aligned, inside the region and
    disjoint; a full region says None; once every slice is freed the region is one free run
    again, so a request the size of the region fits."""
    rng = random.Random(5)
    size = 1 << 20
    a = SliceAllocator(size)
    live: dict[int, int] = {}
    refused = 0
    for step in range(3000):
        if live and (rng.random() < 0.45 or refused > 3):
            off = rng.choice(list(live))
            a.free(off)
            del live[off]
            refused = 0
            continue
        n = rng.choice([1, 63, 64, 65, 4000, 70_000, 300_000])
        off = a.alloc(n)
        if off is None:
            refused += 1
            assert sum(-(-v // ALIGN) * ALIGN for v in live.values()) + n > size - 300_000 or len(live) > 4
            continue
        assert off % ALIGN == 0 and off + n <= size
        for o, m in live.items():
            assert off + n <= o or o + m <= off, (off, n, o, m)
        live[off] = n
    for off in list(live):
        a.free(off)
    assert a.used_bytes == 0
    assert a.alloc(size) == 0


def test_freed_neighbours_merge_both_ways():
    a = SliceAllocator(4 * ALIGN)
    x, y, z, w = (a.alloc(ALIGN) for _ in range(4))
    assert (x, y, z, w) == (0, ALIGN, 2 * ALIGN, 3 * ALIGN) and a.alloc(1) is None
    a.free(y)
    a.free(w)
    assert a.alloc(2 * ALIGN) is None          # two free runs, neither wide enough
    a.free(z)                                  # merges with y's run before it and w's after it
    assert a.alloc(3 * ALIGN) == ALIGN


def test_bytes_tensor_is_tritons_serialization():
    """Length-prefixed elements, as tritonclient serializes a BYTES tensor for the message."""
    from tritonclient.utils import serialize_byte_tensor

    items = [b"", b"media", bytes(range(256)) * 3]
    want = serialize_byte_tensor(np.array(items, dtype=np.object_)).item()
    buf = memoryview(bytearray(len(want) + 10))
    assert write_bytes_tensor(buf, 7, items) == bytes_tensor_size(items) == len(want)
    assert bytes(buf[7:7 + len(want)]) == want


def test_only_a_local_triton_gets_the_region():
    assert is_local("localhost:8001") and is_local("127.0.0.1:8001") and is_local("[::1]:8001")
    assert not is_local("10.1.2.3:8001") and not is_local("no-such-host.invalid:8001")


class _Triton:
    """register_system_shared_memory as Triton answers it: ok, or refused."""

    def __init__(self, refuse: bool = False):
        self.refuse, self.registered = refuse, []

    async def register_system_shared_memory(self, name, key, size):
        if self.refuse:
            raise RuntimeError("Unable to open shared memory region")
        self.registered.append((name, key, size))

    async def unregister_system_shared_memory(self, name):
        self.registered = [r for r in self.registered if r[0] != name]


def test_inputs_take_a_slice_only_when_large_and_give_it_back():
    """An input under MIN_BYTES rides in the message; a large one is written to the region (the
    bytes Triton will read: its serialization at the input's offset) and its slice comes back when
    released, or QUARANTINE_S later when released early; a region Triton refuses turns the path
    off, with the inputs in messages."""
    async def go():
        triton = _Triton()
        shm = ShmInputs(triton, 16 << 20)
        assert await shm.ready() and len(triton.registered) == 1 and triton.registered[0][2] == 16 << 20
        assert shm.place("text_input", np.array([b"small"], dtype=np.object_)) is None
        big = np.array([b"x" * MIN_BYTES, b"y" * 10], dtype=np.object_)
        t, release = shm.place("media", big)
        params = t._get_tensor().parameters
        offset = params["shared_memory_offset"].int64_param
        n = params["shared_memory_byte_size"].int64_param
        assert params["shared_memory_region"].string_param == shm.name and n == bytes_tensor_size(big)
        assert bytes(shm._shm.buf[offset:offset + 4]) == MIN_BYTES.to_bytes(4, "little")
        assert bytes(shm._shm.buf[offset + n - 10:offset + n]) == b"y" * 10
        assert shm.used_bytes >= n and shm.placed == 1
        release()
        assert shm.used_bytes == 0
        _, late = shm.place("media", big)
        import openai_frontend.shm_inputs as mod
        mod.QUARANTINE_S, keep = 0.05, mod.QUARANTINE_S
        try:
            late(False)
            assert shm.used_bytes > 0
            await asyncio.sleep(0.2)
            assert shm.used_bytes == 0
        finally:
            mod.QUARANTINE_S = keep
        await shm.close()
        assert triton.registered == []
        refused = ShmInputs(_Triton(refuse=True), 16 << 20)
        assert not await refused.ready() and refused.disabled
        assert refused.place("media", big) is None
    asyncio.run(go())


@pytest.mark.parametrize("mb", [0, 1])
def test_a_region_too_small_is_never_made(mb):
    shm = ShmInputs(_Triton(), mb << 20)
    assert not asyncio.run(shm.ready())
