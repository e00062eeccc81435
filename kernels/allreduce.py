"""A one-shot all-reduce between two GPUs of one host, for a decode step's small sums.

At tp 2 a decode layer sums its partial outputs twice (attention's o_proj, the MoE), and at
batch 1 each sum is 4-16 KB: NCCL takes ~8 us per call inside a CUDA graph (the 235B c1 profile),
about 1.5 ms of a 9.6 ms step. Here each rank writes its tensor straight into the other's
buffer over NVLink, raises a flag there, waits for the other's flag, and adds what arrived to
its own: one kernel, one crossing of the link, no reduction tree.

Each rank allocates one buffer and maps the other's into its address space (CUDA IPC handles,
exchanged over the process group, as torch.multiprocessing shares CUDA tensors; peer access
over NVLink, no multicast). Per chunk of CHUNK elements one program does the
exchange with its counterpart program on the other GPU, with its own flag and epoch counter:
- the epoch (a local int64 per chunk, advanced by the kernel itself, so CUDA graph replays keep
  counting) picks one of two data regions by parity and is the flag value (epoch + 1) sent;
- a rank cannot get two calls ahead of the other on a chunk (each call waits for the other's
  flag of that call), so the region it writes into is never one the other still reads;
- flags only grow (int64), so nothing is reset between calls, and waiting is "flag >= value".
Both ranks add in float32 in the same order (a + b is commutative), so they hold identical sums.

Used where `parallel.all_reduce` finds it set up (`PeerAllReduce.create`: two ranks on one host,
CUDA, the other GPU's buffer mapped, QWEN3VL_PEER_ALLREDUCE not 0) and the tensor fits; otherwise
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

    def __init__(self, mine: torch.Tensor, theirs: torch.Tensor, dtype: torch.dtype, capacity: int):
        """mine, theirs: uint8 buffers of buffer_bytes(capacity, dtype), theirs mapped from the other GPU."""
        self.mine, self.theirs, self.dtype, self.capacity = mine, theirs, dtype, capacity
        data_bytes = 2 * capacity * dtype.itemsize
        self.my_data, self.peer_data = (b[:data_bytes].view(dtype) for b in (mine, theirs))
        self.my_flags, self.peer_flags = (b[data_bytes:].view(torch.int64) for b in (mine, theirs))
        self.epochs = torch.zeros(capacity // CHUNK, dtype=torch.int64, device=mine.device)

    @staticmethod
    def buffer_bytes(capacity: int, dtype: torch.dtype) -> int:
        return 2 * capacity * dtype.itemsize + (capacity // CHUNK) * 8

    @classmethod
    def create(cls, group, rank: int, world: int, device: torch.device, dtype: torch.dtype,
               capacity: int = CAPACITY) -> "PeerAllReduce | None":
        """Collective over `group` (every rank calls it, on one host): the all-reduce, or None on
        every rank when any rank cannot have it (then NCCL does every sum)."""
        import torch.distributed as dist
        from torch.multiprocessing.reductions import reduce_tensor

        def everyone(ok: bool) -> bool:
            flag = torch.tensor([int(ok)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
            return bool(flag.item())

        if not everyone(world == 2 and device.type == "cuda" and capacity % CHUNK == 0
                        and os.environ.get("QWEN3VL_PEER_ALLREDUCE", "1") != "0"
                        and torch.cuda.device_count() > 1):
            return None
        mine = torch.zeros(cls.buffer_bytes(capacity, dtype), dtype=torch.uint8, device=device)
        torch.cuda.synchronize(device)
        try:
            shared = reduce_tensor(mine)
        except Exception as e:               # no CUDA IPC in this build
            log.warning("peer all-reduce: cannot share a buffer (%s)", e)
            shared = None
        handles = [None] * world
        dist.all_gather_object(handles, shared, group=group)      # every rank takes part, whatever failed
        made = None
        try:
            rebuild, args = handles[1 - rank]
            theirs = rebuild(*args)
            # peer access both ways (torch enables it for a copy between the devices)
            theirs[:1].copy_(mine[:1])
            mine[:1].copy_(theirs[:1])
            torch.cuda.synchronize(device)
            made = cls(mine, theirs, dtype, capacity)
        except Exception as e:               # no peer access between these GPUs, or the other rank failed
            log.warning("peer all-reduce unavailable (%s): NCCL does the tensor-parallel sums", e)
        if not everyone(made is not None):
            return None
        dist.barrier(group=group)            # both mapped before either writes into the other
        return made

    def __call__(self, x: torch.Tensor) -> bool:
        if x.dtype != self.dtype or not x.is_contiguous() or x.numel() > self.capacity or x.device != self.mine.device:
            return False
        if x.numel():
            peer_all_reduce_(x, self.my_data, self.peer_data, self.my_flags, self.peer_flags, self.epochs,
                             self.capacity)
        return True

    def close(self) -> None:
        self.my_data = self.peer_data = self.my_flags = self.peer_flags = self.theirs = self.mine = None
