"""A one-shot all-reduce between two GPUs of one host, for a decode step's small sums.

At tp 2 a decode layer sums its partial outputs twice (attention's o_proj, the MoE), and at
batch 1 each sum is 4-16 KB: NCCL takes ~8 us per call inside a CUDA graph (the 235B c1 profile),
about 1.5 ms of a 9.6 ms step. Here each rank writes its tensor straight into the other's
buffer over NVLink, raises a flag there, waits for the other's flag, and adds what arrived to
its own: one kernel, one crossing of the link, no reduction tree.

The buffers are torch symmetric memory (one allocation per rank, each mapped into the other's
address space; NVLink multicast stays off). Per chunk of CHUNK elements one program does the
exchange with its counterpart program on the other GPU, with its own flag and epoch counter:
- the epoch (a local int64 per chunk, advanced by the kernel itself, so CUDA graph replays keep
  counting) picks one of two data regions by parity and is the flag value (epoch + 1) sent;
- a rank cannot get two calls ahead of the other on a chunk (each call waits for the other's
  flag of that call), so the region it writes into is never one the other still reads;
- flags only grow (int64), so nothing is reset between calls, and waiting is "flag >= value".
Both ranks add in float32 in the same order (a + b is commutative), so they hold identical sums.

Used where `parallel.all_reduce` finds it set up (`PeerAllReduce.create`: two ranks on one host,
CUDA, symmetric memory available, QWEN3VL_PEER_ALLREDUCE not 0) and the tensor fits; otherwise
NCCL. Every rank makes the same choice for the same call (same shapes), as collectives need.
"""

from __future__ import annotations

import logging
import os

import torch
import triton
import triton.language as tl

log = logging.getLogger(__name__)

CHUNK = 2048                      # elements per program (4 KB of bf16)
CAPACITY = 64 * 8192              # elements per call: 64 tokens of the widest hidden size (235B: 4096)


@triton.jit
def _peer_all_reduce_kernel(x_ptr, my_data, peer_data, my_flags, peer_flags, epochs, n, region_size,
                            CHUNK: tl.constexpr):
    slot = tl.program_id(0)
    offs = slot * CHUNK + tl.arange(0, CHUNK)
    ok = offs < n
    epoch = tl.load(epochs + slot)
    flag = epoch + 1
    region = (epoch % 2) * region_size
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    tl.store(peer_data + region + offs, x, mask=ok)
    tl.debug_barrier()                 # every thread's part is written before the flag goes up
    tl.atomic_xchg(peer_flags + slot, flag, sem="release", scope="sys")
    while tl.atomic_add(my_flags + slot, 0, sem="acquire", scope="sys") < flag:
        pass
    tl.debug_barrier()
    other = tl.load(my_data + region + offs, mask=ok, other=0.0, volatile=True)
    tl.store(x_ptr + offs, (x.to(tl.float32) + other.to(tl.float32)).to(x_ptr.dtype.element_ty), mask=ok)
    tl.store(epochs + slot, flag)


def peer_all_reduce_(x: torch.Tensor, my_data, peer_data, my_flags, peer_flags, epochs, region_size: int) -> None:
    """x (contiguous, at most region_size elements) summed in place with the other rank's x."""
    n = x.numel()
    _peer_all_reduce_kernel[(triton.cdiv(n, CHUNK),)](x, my_data, peer_data, my_flags, peer_flags, epochs, n,
                                                      region_size, CHUNK=CHUNK, num_warps=4)


class PeerAllReduce:
    """The buffers of one two-rank group; `__call__(x)` sums x in place (True) or declines (False)."""

    def __init__(self, buffer, handle, rank: int, dtype: torch.dtype, capacity: int):
        self.buffer, self.handle, self.dtype, self.capacity = buffer, handle, dtype, capacity
        slots = capacity // CHUNK
        data_bytes = 2 * capacity * dtype.itemsize
        peer = 1 - rank
        self.my_data = handle.get_buffer(rank, [2 * capacity], dtype, 0)
        self.peer_data = handle.get_buffer(peer, [2 * capacity], dtype, 0)
        self.my_flags = handle.get_buffer(rank, [slots], torch.int64, data_bytes // 8)
        self.peer_flags = handle.get_buffer(peer, [slots], torch.int64, data_bytes // 8)
        self.epochs = torch.zeros(slots, dtype=torch.int64, device=buffer.device)

    @staticmethod
    def buffer_bytes(capacity: int, dtype: torch.dtype) -> int:
        return 2 * capacity * dtype.itemsize + (capacity // CHUNK) * 8

    @classmethod
    def create(cls, group, rank: int, world: int, device: torch.device, dtype: torch.dtype,
               capacity: int = CAPACITY) -> "PeerAllReduce | None":
        """Collective over `group` (every rank calls it): the all-reduce, or None on every rank
        when any rank cannot have it (then NCCL does every sum)."""
        import torch.distributed as dist

        ok = (world == 2 and device.type == "cuda" and os.environ.get("QWEN3VL_PEER_ALLREDUCE", "1") != "0"
              and torch.cuda.device_count() > 1 and capacity % CHUNK == 0)
        agree = torch.tensor([int(ok)], device=device)
        dist.all_reduce(agree, op=dist.ReduceOp.MIN, group=group)
        if not agree.item():
            return None
        try:
            import torch.distributed._symmetric_memory as symm_mem

            buffer = symm_mem.empty(cls.buffer_bytes(capacity, dtype), dtype=torch.uint8, device=device)
            buffer.zero_()
            torch.cuda.synchronize(device)
            handle = symm_mem.rendezvous(buffer, group)
            made = cls(buffer, handle, rank, dtype, capacity)
            handle.barrier()
            ok = True
        except Exception as e:          # no symmetric memory here (torch build, driver, no P2P)
            log.warning("peer all-reduce unavailable (%s): NCCL does the tensor-parallel sums", e)
            made, ok = None, False
        agree = torch.tensor([int(ok)], device=device)
        dist.all_reduce(agree, op=dist.ReduceOp.MIN, group=group)
        return made if agree.item() else None

    def __call__(self, x: torch.Tensor) -> bool:
        if x.dtype != self.dtype or not x.is_contiguous() or x.numel() > self.capacity or x.device != self.buffer.device:
            return False
        if x.numel():
            peer_all_reduce_(x, self.my_data, self.peer_data, self.my_flags, self.peer_flags, self.epochs,
                             self.capacity)
        return True

    def close(self) -> None:
        self.my_data = self.peer_data = self.my_flags = self.peer_flags = self.handle = self.buffer = None
