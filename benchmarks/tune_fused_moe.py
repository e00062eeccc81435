"""Offline tuner for the fused MoE's sorted path: writes kernels/configs/E=..,N=..,K=..,device=...json.

    python -m benchmarks.tune_fused_moe [--experts 128 --hidden 2048 --inter 768 --topk 8]
        [--fp8] [--ep N] [--ms 1,2,4,...] [--out FILE]

A pruned search (tile shapes by M, warps, stages, grouping), each launch shape timed as a CUDA
graph replay (as decode runs it) with uniform routing; each M's winner is checked against the
PyTorch reference before it is written. At M <= 16 the pair path is timed too, and the table's
"pair_path_max_m" is the largest M up to which it beats the sorted path. `--fp8`: 128x128 block
fp8 experts (W8A8), to the fp8 table. `--ep N`: one rank's share under expert parallelism,
`--experts` local experts of N times as many, so a token's top-k land here about 1/N of the time
(the rest take the sentinel id, as the model hands them over). The serving path only reads the
table (nearest M).
"""

import argparse
import itertools
import json
from pathlib import Path

import torch
import triton

from kernels.fp8 import dequantize_weight_blocks
from kernels.fused_moe import (PAIR_PATH_MAX_M, config_file, fused_moe, fused_moe_pairs, fused_moe_reference,
                               lookup_config)
from qwen3vl_backend.layers.moe import route

from .common import fp8_experts, graph_time_ms

MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
BLOCK = (128, 128)


def candidates(m: int, quick: bool = False):
    """Launch shapes for M tokens: BLOCK_M by M, GROUP_M only where there are many M blocks, and
    K steps of at most 128 (inside one fp8 scale block, as the W8A8 dots need). `quick`: one
    BLOCK_M per M and 128-wide K steps (8 shapes: the kernels compile in seconds each)."""
    block_ms = (16, 32) if m <= 64 else (32, 64) if m <= 512 else (64, 128)
    block_ks = (64, 128) if m <= 512 else (128,)
    if quick:
        block_ms, block_ks = block_ms[:1], (128,)
    groups = (1,) if m <= 256 else (8,)
    for bm, bn, bk, warps, stages, group in itertools.product(block_ms, (64, 128), block_ks, (4, 8), (3, 4), groups):
        yield {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "num_warps": warps, "num_stages": stages}


def _experts(e: int, h: int, inter: int, fp8: bool):
    """-> (w13, w2, the kernels' scale kwargs, the bf16 weights the reference multiplies)."""
    w13 = torch.randn(e, 2 * inter, h, device="cuda", dtype=torch.bfloat16) * h ** -0.5
    w2 = torch.randn(e, h, inter, device="cuda", dtype=torch.bfloat16) * inter ** -0.5
    if not fp8:
        return w13, w2, {}, (w13, w2)
    q13, s13, q2, s2 = fp8_experts(w13, w2, BLOCK)
    ref = tuple(torch.stack([dequantize_weight_blocks(q[i], s[i], BLOCK).bfloat16() for i in range(e)])
                for q, s in ((q13, s13), (q2, s2)))
    return q13, q2, {"w13_scale": s13, "w2_scale": s2, "block": BLOCK}, ref


def rank_routing(m: int, e: int, top_k: int, ep: int, device="cuda"):
    """Uniform top-k routing over ep * e experts as this rank (the first e) sees it: ids of other
    ranks' experts become e, the sentinel, with weight 0 (the model's routers hand them over so)."""
    return route(torch.randn(m, e * ep, device=device), top_k, True, 0, e if ep > 1 else None)


def _reference(x, r13, r2, weights, ids, e):
    mine = ids < e                        # the sentinel's pairs add nothing
    return fused_moe_reference(x, r13, r2, weights * mine, torch.where(mine, ids, 0))


def tune(e: int, h: int, inter: int, top_k: int, ms=MS, fp8: bool = False, save=None, quick: bool = False,
         ep: int = 1) -> dict:
    w13, w2, scales, (r13, r2) = _experts(e, h, inter, fp8)
    if ep > 1:
        scales = {**scales, "sentinel": True}
    table, pairs_win = {}, []
    pair_kw = {k: v for k, v in scales.items() if k != "sentinel"}     # the pair kernels skip id e anyway
    tolerance = 6e-2 if fp8 else 1e-2          # fp8: activations quantized per 128-group too
    for m in ms:
        x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
        weights, ids = rank_routing(m, e, top_k, ep)
        best = None
        # the table's current entry competes too: a narrower search keeps what it cannot beat
        incumbent = lookup_config(e, inter, h, m, x.device, BLOCK if fp8 else None)
        for cfg in [*candidates(m, quick), incumbent]:
            try:
                ms_ = graph_time_ms(lambda: fused_moe(x, w13, w2, weights, ids, cfg, **scales), iters=10)
            except (triton.runtime.errors.OutOfResources, RuntimeError):
                torch.cuda.synchronize()
                continue
            if best is None or ms_ < best[0]:
                best = (ms_, cfg)
        ref = _reference(x, r13, r2, weights, ids, e).float()
        got = fused_moe(x, w13, w2, weights, ids, best[1], **scales).float()
        err = ((got - ref).norm() / ref.norm().clamp(min=1e-6)).item()   # no pair here: both zero
        if err > tolerance:
            raise RuntimeError(f"M={m}: best config {best[1]} is wrong (rel err {err:.3g})")
        table[str(m)] = best[1]
        if save is not None:          # what is tuned so far survives a time limit
            save(table)
        line = f"M={m:5d}  sorted {best[0]:.4f} ms  {best[1]}"
        if m <= PAIR_PATH_MAX_M:
            pair_ms = graph_time_ms(lambda: fused_moe_pairs(x, w13, w2, weights, ids, None, **pair_kw), iters=10)
            pairs_win.append((m, pair_ms < best[0]))
            line += f"  pairs {pair_ms:.4f} ms"
        print(line, flush=True)
    table["pair_path_max_m"] = pair_crossover(pairs_win)
    return table


def pair_crossover(pairs_win) -> int:
    """[(M, pairs beat sorted)] -> the largest M the pair path takes: up to the first M the sorted
    path wins at; 0 where it wins at the smallest M timed (batch 1, when not timed, stays on pairs)."""
    wins = dict(pairs_win)
    wins.setdefault(1, True)
    if all(wins.values()):
        return PAIR_PATH_MAX_M
    return max((m for m, _ in itertools.takewhile(lambda t: t[1], sorted(wins.items()))), default=0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--fp8", action="store_true", help="128x128 block fp8 experts (the fp8 table)")
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="the batch sizes to tune")
    ap.add_argument("--ep", type=int, default=1, help="tune one rank's share: --experts local of ep times as many")
    ap.add_argument("--quick", action="store_true", help="8 launch shapes per M instead of 16-32")
    ap.add_argument("--out", default=None, help="write here instead of kernels/configs/")
    args = ap.parse_args(argv)
    path = config_file(args.experts, args.inter, args.hidden, torch.cuda.get_device_name(0),
                       BLOCK if args.fp8 else None)
    path = Path(args.out) if args.out else path
    path.parent.mkdir(parents=True, exist_ok=True)

    def save(table):
        path.write_text(json.dumps(table, indent=1) + "\n")
    table = tune(args.experts, args.hidden, args.inter, args.topk, [int(m) for m in args.ms.split(",")], args.fp8,
                 save, args.quick, args.ep)
    save(table)
    print(json.dumps(table))
    print(path)


if __name__ == "__main__":
    main()
