"""The MoE pair path (batch-1 decode) at 30B-A3B's expert shape under launch-shape variants: each
timed over 16 uniform routings captured back to back (one call's experts are not in L2 for
the next), fp8 (128x128 blocks) and bf16, against the table's shape and the bytes' floor.

    python -m benchmarks.pair_variants [--dtypes fp8,bf16] [--out DIR]

A variant is a patch over the table's shape ({} = the table's own). The TMA variants read
gate_up's weight tiles through tensor descriptors, pipelined `num_stages` deep. Isolated
timings have misled before: a winner here is checked inside whole steps by benchmarks.engine_ab.
"""

from __future__ import annotations

import argparse

import torch

from qwen3vl_kernels.fused_moe import fused_moe_pairs, fused_moe_reference, pair_config
from qwen3vl_backend.layers.moe import route

from .common import fp8_experts, per_call_ms, print_table, write_result
from .roofline import measure as roofline

E, H, INTER, A = 128, 2048, 768, 8
BLOCK = (128, 128)
VARIANTS = {
    "table": {},
    **{f"up-tma-s{s}": {"TMA": True, "num_stages": s} for s in (2, 3, 4)},
    **{f"up-tma-n16-s{s}": {"TMA": True, "num_stages": s, "BLOCK_N": 16} for s in (3, 4)},
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", default="fp8,bf16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    bandwidth = roofline()["copy_bandwidth_tb_s"]
    torch.manual_seed(0)
    w13 = torch.randn(E, 2 * INTER, H, device="cuda", dtype=torch.bfloat16) * H ** -0.5
    w2 = torch.randn(E, H, INTER, device="cuda", dtype=torch.bfloat16) * INTER ** -0.5
    x = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)
    routings = [route(torch.randn(1, E, device="cuda"), A, True) for _ in range(16)]
    rows = []
    for dtype in args.dtypes.split(","):
        fp8 = dtype == "fp8"
        if fp8:
            q13, s13, q2, s2 = fp8_experts(w13, w2, BLOCK)
            weights, kw = (q13, q2), {"w13_scale": s13, "w2_scale": s2, "block": BLOCK}
        else:
            weights, kw = (w13, w2), {}
        floor_us = A * 3 * H * INTER * (1 if fp8 else 2) / (bandwidth * 1e12) * 1e6
        base = pair_config(E, INTER, H, 1, x.device, BLOCK if fp8 else None)
        ref = fused_moe_reference(x, w13, w2, *routings[0]).float()
        for name, patch in VARIANTS.items():
            cfg = {**base, **patch}
            try:
                out = fused_moe_pairs(x, *weights, *routings[0], cfg, **kw).float()
                us = per_call_ms(lambda i: fused_moe_pairs(x, *weights, *routings[i], cfg, **kw)) * 1e3
            except Exception as e:  # noqa: BLE001 - a variant that does not compile or launch is a row
                torch.cuda.synchronize()
                rows.append({"dtype": dtype, "variant": name, "error": f"{type(e).__name__}: {str(e)[:120]}"})
                continue
            err = ((out - ref).norm() / ref.norm()).item()
            rows.append({"dtype": dtype, "variant": name, "us": round(us, 2), "floor_us": round(floor_us, 2),
                         "floor_over": round(floor_us / us, 3), "rel_err": f"{err:.2e}", "config": str(cfg)})
    print_table(rows, ["dtype", "variant", "us", "floor_us", "floor_over", "rel_err", "error"])
    write_result("pair-variants", {"bandwidth_tb_s": bandwidth, "routings": 16, "shape": [E, H, INTER, A]}, rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
