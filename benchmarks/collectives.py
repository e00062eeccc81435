"""The tensor-parallel step's collectives on this host's GPUs: all-reduce of (tokens, hidden) bf16,
eager and inside a CUDA graph, the peer all-reduce (qwen3vl_kernels/allreduce.py, two GPUs) inside a graph,
and the step channel's broadcasts (engine/tp.py).

    python -m benchmarks.collectives [--tp 2] [--hidden 2048,4096] [--out DIR]

A decode step at tp > 1 pays two all-reduces per layer (attention's o_proj and the MLP/MoE), the
LM head's all-gather, and the step's inputs sent from rank 0: the engine benchmark's floor + this
is what a tp step can reach. NVLink multicast stays off (parallel.NO_MULTICAST).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qwen3vl_backend.parallel import disable_multicast

from .common import print_table, write_result

TOKENS = (1, 16, 64, 128, 512, 2048, 4096)     # decode batches, then prefill graphs' sizes


def _time_us(fn, iters: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3


def _graph_us(fn, per_graph: int = 20) -> float:
    """One call's time inside a CUDA graph of `per_graph` back-to-back calls."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn()
    return _time_us(graph.replay, 20) / per_graph


def _worker(rank: int, world: int, port: int, hiddens: list[int], queue, tokens=TOKENS) -> None:
    disable_multicast()
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from qwen3vl_kernels.allreduce import PeerAllReduce

    peer = PeerAllReduce.create(dist.group.WORLD, rank, world, torch.device("cuda", rank), torch.bfloat16)
    rows = []
    for hidden in hiddens:
        for t in tokens:
            x = torch.randn(t, hidden, device="cuda", dtype=torch.bfloat16)
            eager = _time_us(lambda: dist.all_reduce(x))
            graphed = _graph_us(lambda: dist.all_reduce(x))
            fits = peer is not None and x.numel() <= peer.capacity
            peer_graphed = _graph_us(lambda: peer(x)) if fits else None
            packed = torch.zeros(5 * t + 64 * t + t, dtype=torch.long, device="cuda")   # the step's inputs
            channel = _time_us(lambda: dist.broadcast(packed, src=0))
            rows.append({"tp": world, "hidden": hidden, "tokens": t, "all_reduce_eager_us": eager,
                         "all_reduce_graph_us": graphed, "peer_all_reduce_graph_us": peer_graphed,
                         "step_inputs_broadcast_us": channel})
    if peer is not None:
        peer.close()
    if rank == 0:
        queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--hidden", default="2048,4096", help="30B-A3B: 2048, 235B-A22B: 4096")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if torch.cuda.device_count() < args.tp:
        raise SystemExit(f"--tp {args.tp} needs {args.tp} GPUs, {torch.cuda.device_count()} present")
    from qwen3vl_backend.supervisor import free_port

    disable_multicast(os.environ)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, args.tp, port, [int(h) for h in args.hidden.split(",")], queue,
                                                   [int(t) for t in args.tokens.split(",")]))
             for r in range(args.tp)]
    for p in procs:
        p.start()
    rows = queue.get(timeout=600)
    for p in procs:
        p.join(60)
    print_table(rows, list(rows[0]))
    print(write_result("collectives", {"tp": args.tp, "nvls": "off"}, rows, args.out))


if __name__ == "__main__":
    main()
