"""The two-GPU peer all-reduce's protocol (kernels/allreduce.py), run by Triton's interpreter in
two processes over shared CPU memory: each 'rank' pushes into the other's buffer, raises the
other's flag and waits for its own. What the hardware adds (NVLink, sys-scope ordering) is
tests/test_parallel_gpu.py's."""

import pytest
import torch
import torch.multiprocessing as mp

from kernels.allreduce import CHUNK, peer_all_reduce_
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


class _Peer:
    """A rank's view of the shared buffers, as kernels.allreduce.PeerAllReduce holds them."""

    def __init__(self, rank, data, flags, epochs):
        self.my_data, self.peer_data = data[rank], data[1 - rank]
        self.my_flags, self.peer_flags, self.epochs = flags[rank], flags[1 - rank], epochs[rank]
        self.capacity = data[0].numel() // 2

    def takes(self, x):
        return x.numel() <= self.capacity


def _norm_route_rank(rank, data, flags, epochs, xs, plains, fixed, outs):
    from kernels.fused_moe import norm_route

    peer = _Peer(rank, data, flags, epochs)
    d = xs[0].shape[1]
    counter = torch.zeros(1, dtype=torch.int32)
    for i, (x, plain) in enumerate(zip(xs, plains)):
        # the norm + router launch sums x with the other rank's; plain sums between use the same chunks
        h, res, w, ids = norm_route(x, fixed["res"], fixed["nw"], 1e-6, fixed["gate"], 2, True, counter,
                                    first_expert=rank * 4, num_local=4, peer=peer)
        y = plain.clone()
        peer_all_reduce_(y, peer.my_data, peer.peer_data, peer.my_flags, peer.peer_flags, peer.epochs, peer.capacity)
        outs[i][0].copy_(h)
        outs[i][1].copy_(res)
        outs[i][2].copy_(w)
        outs[i][3].copy_(ids.float())
        outs[i][4].copy_(y)
    assert d == fixed["nw"].numel()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's run (on a GPU the kernel is compiled)")
@pytest.mark.parametrize("d", [CHUNK + 40, 96])
def test_norm_route_sums_with_the_other_rank_inside_its_launch(d):
    """kernels.fused_moe.norm_route with `peer`: attention's output summed over the two ranks by
    the all-reduce's protocol inside the norm + router launch (one chunk, or two with a partial
    one), interleaved with plain sums on the same chunks: both ranks get what the sum then the
    unsummed launch give (h, the new residual, their experts' weights and ids), and the epochs
    count every call."""
    from kernels.fused_moe import norm_route

    cap = 3 * CHUNK
    slots = cap // CHUNK
    data = [torch.zeros(2 * cap).share_memory_() for _ in range(2)]
    flags = [torch.zeros(slots, dtype=torch.int64).share_memory_() for _ in range(2)]
    epochs = [torch.zeros(slots, dtype=torch.int64).share_memory_() for _ in range(2)]
    gen = torch.Generator().manual_seed(3)
    fixed = {"res": torch.randn(1, d, generator=gen), "nw": torch.rand(d, generator=gen) + 0.5,
             "gate": torch.randn(8, d, generator=gen) * d ** -0.5}
    calls = 3
    xs = [[torch.randn(1, d, generator=gen).share_memory_() for _ in range(calls)] for _ in range(2)]
    plains = [[torch.randn(CHUNK + 7, generator=gen).share_memory_() for _ in range(calls)] for _ in range(2)]
    shapes = [(1, d), (1, d), (1, 2), (1, 2), (CHUNK + 7,)]
    outs = [[[torch.full(s, float("nan")).share_memory_() for s in shapes] for _ in range(calls)] for _ in range(2)]
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_norm_route_rank, args=(r, data, flags, epochs, xs[r], plains[r], fixed, outs[r]))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    alive = [p.is_alive() for p in procs]
    for p in procs:
        p.kill()
    assert not any(alive), "a rank is still waiting for the other's flag"
    assert [p.exitcode for p in procs] == [0, 0]
    for i in range(calls):
        total = xs[0][i] + xs[1][i]
        for rank in range(2):
            want = norm_route(total, fixed["res"], fixed["nw"], 1e-6, fixed["gate"], 2, True,
                              torch.zeros(1, dtype=torch.int32), first_expert=rank * 4, num_local=4)
            got = outs[rank][i]
            for g, w in zip(got[:3], want[:3]):
                torch.testing.assert_close(g, w, rtol=0, atol=0)
            assert got[3].tolist() == want[3].float().tolist()
            torch.testing.assert_close(got[4], plains[0][i] + plains[1][i])
    used = [-(-n // CHUNK) for n in (d, CHUNK + 7)]          # chunks of the fused sums, of the plain ones
    assert epochs[0].tolist() == epochs[1].tolist() == flags[0].tolist() == \
        [sum(calls for u in used if s < u) for s in range(slots)]


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
