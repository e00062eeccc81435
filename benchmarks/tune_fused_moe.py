"""Offline tuner for the fused MoE's sorted path: writes qwen3vl_kernels/configs/E=..,N=..,K=..,device=...json.

    python -m benchmarks.tune_fused_moe [--experts 128 --hidden 2048 --inter 768 --topk 8]
        [--fp8] [--ep N] [--ms 1,2,4,...] [--out FILE]

A pruned search (tile shapes by M, warps, stages, grouping), each launch shape timed as a CUDA
graph replay (as decode runs it) with uniform routing; each M's winner is checked against the
PyTorch reference before it is written (the pair path and its crossover are `--pairs`'s, below).
`--fp8`: 128x128 block fp8 experts (W8A8), to the fp8 table. `--ep N`: one rank's share under expert parallelism,
`--experts` local experts of N times as many, so a token's top-k land here about 1/N of the time
(the rest take the sentinel id, as the model hands them over). The serving path only reads the
table (nearest M).

    python -m benchmarks.tune_fused_moe --pairs [--fp8] [--ep N] [--ms 1,2,4] [shape flags]

tunes the pair path instead: its launch shapes (gate_up's swept, then down's) at each M, against
the sorted path with the table's shape, both timed over 16 routings cycled (one call's experts
do not serve the next from L2, as in a decode step, where every layer reads its own), and merges
"pairs" ({M: shape}) and "pair_path_max_m" into the shape's table.
"""

import argparse
import itertools
import json
from pathlib import Path

import torch
import triton

from qwen3vl_kernels.fp8 import dequantize_weight_blocks
from qwen3vl_kernels.fused_moe import (PAIR_PATH_MAX_M, config_file, fused_moe, fused_moe_pairs, fused_moe_reference,
                               lookup_config, pair_config)
from qwen3vl_backend.layers.moe import route

from .common import fp8_experts, graph_time_ms, per_call_ms

MS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
BLOCK = (128, 128)


def candidates(m: int, quick: bool = False, wide: bool = False):
    """Launch shapes for M tokens: BLOCK_M by M, GROUP_M only where there are many M blocks, and
    K steps of at most 128 (inside one fp8 scale block, as the W8A8 dots need). `quick`: one
    BLOCK_M per M and 128-wide K steps (8 shapes, 18 up to M=16, before SWAP_AB's twins: the kernels
    compile in seconds each). Up to M=128 each 64- or 128-wide tile has a SWAP_AB twin. `wide` (prefill
    sizes, M > 512): 256-wide N tiles and 5 stages too (36 shapes). Past 512 tokens each shape
    also comes persistent (PERSISTENT: 2 programs an SM)."""
    block_ms = (16, 32) if m <= 64 else (32, 64) if m <= 512 else (64, 128)
    block_ks = (64, 128) if m <= 512 else (128,)
    # a few tokens meet a few experts: narrow N tiles give each expert's weights more programs
    # and deeper pipelines there: fewer programs than SMs each need more bytes in flight (235B's
    # one-token MoE: 64-wide tiles with 6 stages, 7.85 against 8.26 ms a step: NOTES, twelfth session)
    block_ns, stage_counts = ((32, 64, 128) if m <= 16 else (64, 128)), ((3, 4, 6) if m <= 16 else (3, 4))
    if quick:
        block_ms, block_ks = block_ms[:1], (128,)
    elif wide and m > 512:
        block_ns, stage_counts = (64, 128, 256), (3, 4, 5)
    groups = (1,) if m <= 256 else (8,)
    # SWAP_AB (decode sizes, tiles 64 or more wide: the weight rows as wgmma's M side): 30B fp8's
    # sorted path at 16 and 64 tokens, c16 7.269 -> 7.152 ms a step (NOTES, twenty-fourth session)
    swaps = (False, True) if m <= 128 else (False,)
    # PERSISTENT (prefill sizes): the persistent grouped GEMM, 2 programs an SM; 30B fp8 at 954 /
    # 2048 / 4096 tokens 0.982 / 0.966 / 0.976 of the per-tile launch (NOTES, thirty-third session)
    persistents = (0, 2) if m > 512 else (0,)
    for bm, bn, bk, warps, stages, group, swap, persistent in itertools.product(
            block_ms, block_ns, block_ks, (4, 8), stage_counts, groups, swaps, persistents):
        if swap and bn < 64:
            continue
        yield {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "num_warps": warps, "num_stages": stages,
               **({"SWAP_AB": True} if swap else {}), **({"PERSISTENT": persistent} if persistent else {})}


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
         ep: int = 1, wide: bool = False, cycled: bool = False) -> dict:
    """`cycled`: time each launch shape over 16 routings captured back to back, so that one call's
    experts are not in L2 for the next (a decode step's layers each read their own); otherwise one
    routing replayed, which at a few tokens times partly L2-resident experts."""
    w13, w2, scales, (r13, r2) = _experts(e, h, inter, fp8)
    if ep > 1:
        scales = {**scales, "sentinel": True}
    table = {}
    tolerance = 6e-2 if fp8 else 1e-2          # fp8: activations quantized per 128-group too
    for m in ms:
        x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
        routings = [rank_routing(m, e, top_k, ep) for _ in range(16 if cycled else 1)]
        weights, ids = routings[0]
        best = None
        # the table's current entry competes too: a narrower search keeps what it cannot beat
        incumbent = lookup_config(e, inter, h, m, x.device, BLOCK if fp8 else None)
        for cfg in [*candidates(m, quick, wide), incumbent]:
            try:
                if cycled:
                    ms_ = per_call_ms(lambda i: fused_moe(x, w13, w2, *routings[i], cfg, **scales), len(routings))
                else:
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
        pairs = m * top_k / ep                 # this rank's share of the token-expert pairs
        tflops = pairs * 2 * (2 * inter * h + h * inter) / best[0] / 1e9
        print(f"M={m:5d}  sorted {best[0]:.4f} ms ({tflops:.0f} TFLOP/s)  {best[1]}", flush=True)
    return table


# gate_up's keys, then down's: each swept with the other held
PAIR_SPACES = ((("BLOCK_N", "BLOCK_K", "num_warps", "num_stages"), ((4, 8, 16), (128, 256, 512), (4, 8), (1, 3))),
               (("DOWN_BLOCK_N", "DOWN_BLOCK_K", "down_warps", "down_stages"), ((4, 8, 16), (128, 256, 512), (4, 8),
                                                                                (1, 3))))


# fp8 weights: then whether each kernel loads its scales once per block of a K step, not per column
FP8_PAIR_SPACES = ((("GROUP_SCALE", "DOWN_GROUP_SCALE"), ((False, True), (False, True))),)


def tune_pairs(e: int, h: int, inter: int, top_k: int, ms=(1, 2, 4), fp8: bool = False, ep: int = 1,
               spaces=PAIR_SPACES, save=None) -> tuple[dict, list[dict]]:
    """-> ({"pairs": {M: best pair shape}, "pair_path_max_m": M}, rows), handed to `save` after
    each M too (a time limit keeps what is done). Each M's winner is checked against the
    reference. (Isolated timings can mislead: compare the crossover inside a whole step with
    QWEN3VL_PAIR_MAX_M, as the 235B ep2 table's was.)"""
    w13, w2, scales, (r13, r2) = _experts(e, h, inter, fp8)
    pair_kw = {k: v for k, v in scales.items() if k != "sentinel"}
    sorted_kw = {**scales, "sentinel": True} if ep > 1 else scales
    block = BLOCK if fp8 else None
    table, rows, wins = {}, [], []
    for m in ms:
        x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
        routings = [rank_routing(m, e, top_k, ep) for _ in range(16)]

        def timed(cfg):
            return per_call_ms(lambda i: fused_moe_pairs(x, w13, w2, *routings[i], cfg, **pair_kw))
        cfg = pair_config(e, inter, h, m, x.device, block)
        start_ms = best_ms = timed(cfg)
        for keys, space in (*spaces, *(FP8_PAIR_SPACES if fp8 else ())):
            start = cfg
            for shape in itertools.product(*space):
                trial = {**start, **dict(zip(keys, shape))}
                try:
                    ms_ = timed(trial)
                except (triton.runtime.errors.OutOfResources, RuntimeError) as err:   # registers, shared memory
                    torch.cuda.synchronize()
                    print(f"pairs M={m} {trial}: {type(err).__name__}", flush=True)
                    continue
                if ms_ < best_ms:
                    best_ms, cfg = ms_, trial
        weights, ids = routings[0]
        ref = _reference(x, r13, r2, weights, ids, e).float()
        err = ((fused_moe_pairs(x, w13, w2, weights, ids, cfg, **pair_kw).float() - ref).norm()
               / ref.norm().clamp(min=1e-6)).item()
        if err > (2e-2 if fp8 else 1e-2):
            raise RuntimeError(f"M={m}: best pair config {cfg} is wrong (rel err {err:.3g})")
        sorted_cfg = lookup_config(e, inter, h, m, x.device, block)
        sorted_ms = per_call_ms(lambda i: fused_moe(x, w13, w2, *routings[i], sorted_cfg, **sorted_kw))
        table[str(m)] = cfg
        wins.append((m, best_ms < sorted_ms))
        rows.append({"E": e, "N": inter, "K": h, "ep": ep, "fp8": fp8, "M": m, "pairs_before_ms": start_ms,
                     "pairs_ms": best_ms, "sorted_ms": sorted_ms, "config": json.dumps(cfg)})
        print(f"M={m:3d}  pairs {start_ms:.4f} -> {best_ms:.4f} ms  sorted {sorted_ms:.4f} ms  {cfg}", flush=True)
        if save is not None:
            save({"pairs": dict(table), "pair_path_max_m": pair_crossover(wins, m)})
    return {"pairs": table, "pair_path_max_m": pair_crossover(wins, max(ms))}, rows


def pair_crossover(pairs_win, all_won: int = PAIR_PATH_MAX_M) -> int:
    """[(M, pairs beat sorted)] -> the largest M the pair path takes: up to the first M the sorted
    path wins at; 0 where it wins at the smallest M timed (batch 1, when not timed, stays on pairs);
    `all_won` where the pair path won at every M timed."""
    wins = dict(pairs_win)
    wins.setdefault(1, True)
    if all(wins.values()):
        return all_won
    return max((m for m, _ in itertools.takewhile(lambda t: t[1], sorted(wins.items()))), default=0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--fp8", action="store_true", help="128x128 block fp8 experts (the fp8 table)")
    ap.add_argument("--ms", default=None, help="the batch sizes to tune (default: all of MS; --pairs: 1,2,4)")
    ap.add_argument("--ep", type=int, default=1, help="tune one rank's share: --experts local of ep times as many")
    ap.add_argument("--quick", action="store_true", help="8 launch shapes per M instead of 16-32")
    ap.add_argument("--wide", action="store_true", help="prefill sizes (M > 512): 36 launch shapes, 256-wide N tiles")
    ap.add_argument("--cycled", action="store_true",
                    help="time each shape over 16 routings (experts past L2, as in a decode step)")
    ap.add_argument("--out", default=None, help="write here instead of qwen3vl_kernels/configs/")
    ap.add_argument("--pairs", action="store_true", help="tune the pair path (small M) and merge it into the table")
    ap.add_argument("--rows", default=None, help="--pairs: also write the timings (JSON rows) here")
    args = ap.parse_args(argv)
    path = config_file(args.experts, args.inter, args.hidden, torch.cuda.get_device_name(0),
                       BLOCK if args.fp8 else None)
    path = Path(args.out) if args.out else path
    path.parent.mkdir(parents=True, exist_ok=True)

    def save(table):          # merged: the sorted tuning and --pairs each keep the other's keys, and untuned M
        old = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**old, **table}, indent=1) + "\n")
    if args.pairs:
        found, rows = tune_pairs(args.experts, args.hidden, args.inter, args.topk,
                                 [int(m) for m in (args.ms or "1,2,4").split(",")], args.fp8, args.ep, save=save)
        save(found)
        if args.rows:
            Path(args.rows).write_text(json.dumps(rows, indent=1) + "\n")
        print(json.dumps(found))
        print(path)
        return
    ms = [int(m) for m in args.ms.split(",")] if args.ms else MS
    table = tune(args.experts, args.hidden, args.inter, args.topk, ms, args.fp8,
                 save, args.quick, args.ep, args.wide, args.cycled)
    save(table)
    print(json.dumps(table))
    print(path)


if __name__ == "__main__":
    main()
