"""A tensor-parallel rank other than the engine's: load this rank's shard, then run the steps
rank 0 sends (engine/tp.py) until it says stop.

Started by rank 0 for its own node (`--rank R --settings JSON`). On every other node of a
multi-node group the user starts the node's ranks with the same model flags as node 0:

    python -m qwen3vl_backend.engine.tp_worker --model-path DIR --tp 16 --nnodes 2 --node-rank 1 \\
        --dist-init-addr NODE0:5000 [--ep N] [--load-format dummy] [--quantization fp8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys

from ..config import EngineConfig


def _node(args) -> int:
    """All of this node's ranks, as processes; exits when they do (non-zero if any failed)."""
    from .tp import start_local_workers, wait_all

    cfg = EngineConfig(model_path=args.model_path, device=args.device, dtype=args.dtype, load_format=args.load_format,
                       quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype, tp_size=args.tp,
                       ep_size=args.ep, nnodes=args.nnodes, node_rank=args.node_rank, dist_init_addr=args.dist_init_addr)
    per_node = cfg.tp_size // cfg.nnodes
    settings = dataclasses.asdict(cfg)
    procs = start_local_workers(settings, list(range(cfg.node_rank * per_node, (cfg.node_rank + 1) * per_node)))
    codes = [p.wait() for p in procs]
    wait_all(procs, 0)
    return max(codes, default=0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int)
    ap.add_argument("--settings", help="the engine's settings as JSON (given by rank 0)")
    ap.add_argument("--model-path")
    ap.add_argument("--tp", "--tp-size", dest="tp", type=int, default=1)
    ap.add_argument("--ep", "--ep-size", dest="ep", type=int, default=1)
    ap.add_argument("--nnodes", type=int, default=1)
    ap.add_argument("--node-rank", type=int, default=0)
    ap.add_argument("--dist-init-addr", default="")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--quantization", default="")
    ap.add_argument("--kv-cache-dtype", default="auto")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s tp-worker %(levelname)s %(message)s")
    if args.rank is None:
        if args.node_rank < 1 or not args.model_path:
            ap.error("without --rank: --model-path and --node-rank >= 1 (node 0 is the server's)")
        return _node(args)
    from .model_runner import ModelRunner
    from .tp import shutdown_group

    # a signal to the whole process group (a launcher stopping Triton) must not take a rank away
    # under rank 0, which stops the ranks itself as it closes; if rank 0 dies, PDEATHSIG ends this
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cfg = EngineConfig(**json.loads(args.settings))
    runner = ModelRunner(cfg, args.rank)
    runner.serve_steps()
    runner.release_graphs()
    if not shutdown_group():          # rank 0 never joined the teardown: exit without the group's destructors
        sys.stdout.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
