"""The two-GPU peer all-reduce's protocol (qwen3vl_kernels/allreduce.py), run by Triton's interpreter in
two processes over shared CPU memory: each 'rank' pushes into the other's buffer, raises the
other's flag and waits for its own. What the hardware adds (NVLink, sys-scope ordering) is
tests/test_parallel_gpu.py's."""

import pytest
import torch
import torch.multiprocessing as mp

from qwen3vl_kernels.allreduce import CHUNK, peer_all_reduce_
from qwen3vl_backend import parallel


def _rank(rank, data, flags, epochs, xs, outs, programs):
    for i, (x, out, g) in enumerate(zip(xs, outs, programs)):
        y = x.clone()
        peer_all_reduce_(y, data[rank], data[1 - rank], flags[rank], flags[1 - rank], epochs[rank],
                         data[0].numel() // 2, programs=g[rank])
        out.copy_(y)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's run (on a GPU the kernel is compiled)")
def test_peer_all_reduce_sums_across_two_processes():
    """Sizes from one element to the whole capacity, partial chunks, one program per chunk or
    programs of several chunks, in a sequence that reuses both data regions of every chunk: both ranks end with x0 + x1, bit for bit the same, and each
    chunk's epoch counts the calls that used it. (Fails if a rank reads before the other's flag;
    a race the interpreter's timing does not provoke, such as one data region instead of two, is
    left to the GPU test.)"""
    cap = 3 * CHUNK
    slots = cap // CHUNK
    data = [torch.zeros(2 * cap).share_memory_() for _ in range(2)]
    flags = [torch.zeros(slots, dtype=torch.int64).share_memory_() for _ in range(2)]
    epochs = [torch.zeros(slots, dtype=torch.int64).share_memory_() for _ in range(2)]
    sizes = [5, CHUNK + 3, cap, 1, 2 * CHUNK, cap, 2 * CHUNK + 1]
    # programs per call on each rank: one per chunk, or fewer, each taking several chunks (the
    # ranks need not agree)
    programs = [(None, None), (None, None), (1, 2), (None, None), (1, 1), (2, 1), (1, None)]
    xs = [[torch.randn(n).share_memory_() for n in sizes] for _ in range(2)]
    outs = [[torch.full((n,), float("nan")).share_memory_() for n in sizes] for _ in range(2)]
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_rank, args=(r, data, flags, epochs, xs[r], outs[r], programs)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    alive = [p.is_alive() for p in procs]
    for p in procs:
        p.kill()
    assert not any(alive), "a rank is still waiting for the other's flag"
    assert [p.exitcode for p in procs] == [0, 0]
    for i in range(len(sizes)):
        assert torch.equal(outs[0][i], outs[1][i])
        torch.testing.assert_close(outs[0][i], xs[0][i] + xs[1][i])
    calls = [sum(1 for n in sizes if n > s * CHUNK) for s in range(slots)]
    assert epochs[0].tolist() == epochs[1].tolist() == calls == flags[0].tolist()


def test_all_reduce_falls_back_when_the_peer_path_declines(monkeypatch):
    """parallel.all_reduce: the peer all-reduce where it takes the tensor, torch.distributed
    otherwise (what it declines: other dtypes, more than its capacity)."""
    import torch.distributed as dist

    seen = []
    monkeypatch.setattr(dist, "all_reduce", lambda t: seen.append(("nccl", t.numel())))
    parallel.set_peer_all_reduce(lambda t: t.numel() <= 4 and not seen.append(("peer", t.numel())))
    try:
        parallel.all_reduce(torch.ones(4))
        parallel.all_reduce(torch.ones(5))
    finally:
        parallel.set_peer_all_reduce(None)
    parallel.all_reduce(torch.ones(3))
    assert seen == [("peer", 4), ("nccl", 5), ("nccl", 3)]
