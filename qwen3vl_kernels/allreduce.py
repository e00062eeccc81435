"""A one-shot all-reduce between two GPUs of one host, for decode steps' and prefill graphs' sums.

At tp 2 a decode layer sums its partial outputs twice (attention's o_proj, the MoE), and at
batch 1 each sum is 4-16 KB: NCCL takes 11-12 us per call inside a CUDA graph on two H200s,
about 2.2 ms of 235B-A22B's 9.7 ms step. Here each rank writes its tensor straight into the
other's buffer over NVLink, raises a flag there, waits for the other's flag, and adds what
arrived to its own: one kernel, one crossing of the link, no reduction tree (3.7 us at one
token; the step went to 8.8 ms: benchmarks/results/NOTES.md, fifth session). A prefill graph's
sums (16 MB at 2048 tokens x 4096) took 69 us here against NCCL's 81 (seventh session).

Each rank allocates one buffer (cudaMalloc) and maps the other's into its own device's context
(cudaIpcOpenMemHandle with lazy peer access: the handles go over the process group; NVLink, no
multicast). torch's own tensor sharing maps a peer's memory in the peer device's context, where
Triton on this device refuses the pointer; torch symmetric memory's rendezvous hung on the
two-H200 host. Each chunk of CHUNK elements is exchanged with its own flag and epoch counter, by
at most a few programs an SM (each pushes all its chunks before it waits for any, so the waits
never depend on a program the other GPU has not scheduled):
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

import ctypes
import functools
import logging
import os

import torch
import triton
import triton.language as tl

log = logging.getLogger(__name__)

CHUNK = 2048                      # elements per program (4 KB of bf16)
# elements per call: a 4096-token prefill graph of the widest hidden size (235B: 4096), 67 MB of
# buffer per rank. Prefill sums are 16 MB at 2048 tokens, where NCCL took 78 us inside the graph.
CAPACITY = 4096 * 4096


@triton.jit
def _peer_all_reduce_kernel(x_ptr, my_data, peer_data, my_flags, peer_flags, epochs, n, region_size,
                            CHUNK: tl.constexpr):
    """Program p takes chunks p, p + G, p + 2G, ... (G programs): it pushes every one of them
    and raises their flags before it waits for any, so no program waits on the other GPU for
    something a waiting program there has yet to send. (Raising a program's flags only after all
    its data, behind one barrier, was slower at every size on two H200s: NOTES, eighth session.)"""
    first = tl.program_id(0)
    step = tl.num_programs(0)
    chunks = tl.cdiv(n, CHUNK)
    for slot in range(first, chunks, step):                 # push
        offs = slot * CHUNK + tl.arange(0, CHUNK)
        ok = offs < n
        epoch = tl.load(epochs + slot)
        x = tl.load(x_ptr + offs, mask=ok, other=0.0)
        tl.store(peer_data + (epoch % 2) * region_size + offs, x, mask=ok)
        tl.debug_barrier()             # every thread's part is written before the flag goes up
        tl.atomic_xchg(peer_flags + slot, epoch + 1, sem="release", scope="sys")
    for slot in range(first, chunks, step):                 # wait, add
        offs = slot * CHUNK + tl.arange(0, CHUNK)
        ok = offs < n
        epoch = tl.load(epochs + slot)
        flag = epoch + 1
        while tl.atomic_add(my_flags + slot, 0, sem="acquire", scope="sys") < flag:
            pass
        tl.debug_barrier()
        x = tl.load(x_ptr + offs, mask=ok, other=0.0)      # still this rank's own: chunks are disjoint
        other = tl.load(my_data + (epoch % 2) * region_size + offs, mask=ok, other=0.0, volatile=True)
        tl.store(x_ptr + offs, (x.to(tl.float32) + other.to(tl.float32)).to(x_ptr.dtype.element_ty), mask=ok)
        tl.store(epochs + slot, flag)


@functools.lru_cache(maxsize=None)
def _max_programs(device: torch.device) -> int:
    """Programs per call: few enough to be resident together on every SM (4 warps each, 4 per
    SM), as the waits need: a program that waited on one not yet scheduled on the other GPU,
    whose SMs were full of waiting programs, would never finish. (One program per chunk, as
    before, put 4,096 programs in flight at 2048 tokens x 4096: more than the SMs hold.)"""
    if device.type != "cuda":
        return 64
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def peer_all_reduce_(x: torch.Tensor, my_data, peer_data, my_flags, peer_flags, epochs, region_size: int,
                     programs: int | None = None) -> None:
    """x (contiguous, at most region_size elements) summed in place with the other rank's x.
    `programs`: at most this many programs (default: what every SM holds at once); the ranks may
    choose differently."""
    n = x.numel()
    grid = min(triton.cdiv(n, CHUNK), programs or _max_programs(x.device))
    _peer_all_reduce_kernel[(grid,)](x, my_data, peer_data, my_flags, peer_flags, epochs, n, region_size,
                                     CHUNK=CHUNK, num_warps=4)


class _Handle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_byte * 64)]          # cudaIpcMemHandle_t


class _DevicePointer:
    """A raw device address as Triton takes a tensor argument (data_ptr and dtype)."""

    def __init__(self, ptr: int, dtype: torch.dtype):
        self.ptr, self.dtype = ptr, dtype

    def data_ptr(self) -> int:
        return self.ptr


@functools.lru_cache(maxsize=None)
def _cudart():
    """The CUDA runtime torch loaded (its path from this process's mappings)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "libcudart.so" in line:
                return ctypes.CDLL(line.split()[-1])
    for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise OSError("no CUDA runtime library found")


def _check(code: int, what: str) -> None:
    if code:
        raise RuntimeError(f"{what}: CUDA error {code}")


class PeerAllReduce:
    """The buffers of one two-rank group; `__call__(x)` sums x in place (True) or declines (False)."""

    def __init__(self, mine: int, theirs: int, device: torch.device, dtype: torch.dtype, capacity: int):
        """mine: this rank's buffer (cudaMalloc'd, buffer_bytes), theirs: the other's, mapped here."""
        self.mine, self.theirs, self.device, self.dtype, self.capacity = mine, theirs, device, dtype, capacity
        data_bytes = 2 * capacity * dtype.itemsize
        self.my_data, self.peer_data = (_DevicePointer(p, dtype) for p in (mine, theirs))
        self.my_flags, self.peer_flags = (_DevicePointer(p + data_bytes, torch.int64) for p in (mine, theirs))
        self.epochs = torch.zeros(capacity // CHUNK, dtype=torch.int64, device=device)

    @staticmethod
    def buffer_bytes(capacity: int, dtype: torch.dtype) -> int:
        return 2 * capacity * dtype.itemsize + (capacity // CHUNK) * 8

    @classmethod
    def create(cls, group, rank: int, world: int, device: torch.device, dtype: torch.dtype,
               capacity: int = CAPACITY, same_device: bool = False) -> "PeerAllReduce | None":
        """Collective over `group` (every rank calls it, on one host): the all-reduce, or None on
        every rank when any rank cannot have it (then NCCL does every sum). `same_device`: both
        ranks on one GPU (tests of tensor parallelism there, qwen3vl_backend.parallel.one_device),
        only with QWEN3VL_PEER_ALLREDUCE=1: the two processes' kernels take turns on the GPU
        (time slices), so each sum waits for the other's slice."""
        import torch.distributed as dist

        def everyone(ok: bool) -> bool:
            flag = torch.tensor([int(ok)], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
            return bool(flag.item())

        wanted = os.environ.get("QWEN3VL_PEER_ALLREDUCE", "0" if same_device else "1") != "0"
        if not everyone(world == 2 and device.type == "cuda" and capacity % CHUNK == 0 and wanted
                        and (torch.cuda.device_count() > 1 or same_device)):
            return None
        mine, handle = None, None
        try:
            rt = _cudart()
            nbytes = cls.buffer_bytes(capacity, dtype)
            ptr, h = ctypes.c_void_p(), _Handle()
            _check(rt.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(nbytes)), "cudaMalloc")
            mine = ptr.value
            _check(rt.cudaMemset(ptr, 0, ctypes.c_size_t(nbytes)), "cudaMemset")
            _check(rt.cudaDeviceSynchronize(), "cudaDeviceSynchronize")
            _check(rt.cudaIpcGetMemHandle(ctypes.byref(h), ptr), "cudaIpcGetMemHandle")
            handle = bytes(h)
        except Exception as e:               # no CUDA runtime to call, no IPC
            log.warning("peer all-reduce: cannot share a buffer (%s)", e)
        handles = [None] * world
        dist.all_gather_object(handles, handle, group=group)      # every rank takes part, whatever failed
        made = None
        try:
            theirs = ctypes.c_void_p()
            _check(_cudart().cudaIpcOpenMemHandle(ctypes.byref(theirs), _Handle.from_buffer_copy(handles[1 - rank]),
                                                  ctypes.c_uint(1)), "cudaIpcOpenMemHandle")   # lazy peer access
            made = cls(mine, theirs.value, device, dtype, capacity)
        except Exception as e:               # no peer access between these GPUs, or the other rank failed
            log.warning("peer all-reduce unavailable (%s): NCCL does the tensor-parallel sums", e)
        if not everyone(made is not None):
            if made is not None:
                made.close()
            elif mine is not None:
                _cudart().cudaFree(ctypes.c_void_p(mine))
            return None
        dist.barrier(group=group)            # both mapped before either writes into the other
        return made

    def __call__(self, x: torch.Tensor) -> bool:
        if x.dtype != self.dtype or not x.is_contiguous() or x.numel() > self.capacity or x.device != self.device:
            return False
        if x.numel():
            peer_all_reduce_(x, self.my_data, self.peer_data, self.my_flags, self.peer_flags, self.epochs,
                             self.capacity)
        return True

    def close(self) -> None:
        """Unmap the other's buffer and free this one (after every use: the runner synchronizes)."""
        if self.theirs is not None:
            rt = _cudart()
            torch.cuda.synchronize(self.device)
            rt.cudaIpcCloseMemHandle(ctypes.c_void_p(self.theirs))
            rt.cudaFree(ctypes.c_void_p(self.mine))
        self.theirs = self.mine = self.my_data = self.peer_data = self.my_flags = self.peer_flags = None
