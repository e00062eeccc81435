"""Offline tuner for the fused MoE kernel: writes kernels/configs/E=..,N=..,K=..,device=....json.

    python -m benchmarks.tune_fused_moe [--experts 128 --hidden 2048 --inter 768 --topk 8] [--out-dir DIR]

A pruned search (tile shapes by M, warps, stages, grouping) timed with CUDA events; each M's
winner is checked against the PyTorch reference before it is written. The serving path only
reads the table (nearest M), never searches.
"""

import argparse
import itertools
import json
from pathlib import Path

import torch
import triton

from kernels.fused_moe import config_file, fused_moe, fused_moe_reference
from qwen3vl_backend.layers.moe import route

from .common import cuda_time_ms

MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def candidates(m: int):
    block_ms = (16, 32) if m <= 64 else (32, 64) if m <= 512 else (64, 128)
    for bm, bn, bk, warps, stages, group in itertools.product(block_ms, (64, 128), (64, 128), (4, 8), (3, 4), (1, 8)):
        yield {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "num_warps": warps, "num_stages": stages}


def tune(e: int, h: int, inter: int, top_k: int) -> dict:
    w13 = torch.randn(e, 2 * inter, h, device="cuda", dtype=torch.bfloat16) * h ** -0.5
    w2 = torch.randn(e, h, inter, device="cuda", dtype=torch.bfloat16) * inter ** -0.5
    table = {}
    for m in MS:
        x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
        weights, ids = route(torch.randn(m, e, device="cuda"), top_k, True)
        best = None
        for cfg in candidates(m):
            try:
                ms = cuda_time_ms(lambda: fused_moe(x, w13, w2, weights, ids, cfg), warmup=2, iters=10)
            except (triton.runtime.errors.OutOfResources, RuntimeError):
                continue
            if best is None or ms < best[0]:
                best = (ms, cfg)
        ref = fused_moe_reference(x, w13, w2, weights, ids).float()
        err = ((fused_moe(x, w13, w2, weights, ids, best[1]).float() - ref).norm() / ref.norm()).item()
        if err > 1e-2:
            raise RuntimeError(f"M={m}: best config {best[1]} is wrong (rel err {err:.3g})")
        table[str(m)] = best[1]
        print(f"M={m:5d}  {best[0]:.4f} ms  {best[1]}", flush=True)
    return table


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    table = tune(args.experts, args.hidden, args.inter, args.topk)
    path = config_file(args.experts, args.inter, args.hidden, torch.cuda.get_device_name(0))
    if args.out_dir:
        path = Path(args.out_dir) / path.name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1))
    print(path)


if __name__ == "__main__":
    main()
