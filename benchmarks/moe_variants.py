"""The fused MoE's sorted path at prefill sizes (30B-A3B's experts, uniform routing) under launch
variants: each a patch over the table's entry for that M ({} = the table's own; a "DOWN" key
patches the down GEMM alone; "switches" sets qwen3vl_kernels.switches values for the variant's calls),
timed per call over weight copies and routings captured back to back (a prefill reads each
layer's experts once; the copies keep one call's from L2 for the next), against the table's
entry and the bytes' floor (every expert's weights read once).

    python -m benchmarks.moe_variants [--ms 954,2048] [--dtypes fp8,bf16] [--variants a,b] [--out DIR]
    python -m benchmarks.moe_variants --ncu [--ms 954] [--variants table,p2]

`--ncu`: each variant run twice and nothing timed, for Nsight Compute to profile the second
run's grouped GEMMs (`ncu -k regex:_grouped_gemm ...`; next-lease.sh's moe part).
"""

from __future__ import annotations

import argparse
import contextlib
from unittest import mock

import torch

from qwen3vl_kernels import switches
from qwen3vl_kernels.fused_moe import fused_moe, fused_moe_reference, lookup_config
from qwen3vl_backend.layers.moe import route

from .common import against_table, fp8_experts, print_table, variant_row, write_result
from .roofline import measure as roofline

E, H, INTER, A = 128, 2048, 768, 8
BLOCK = (128, 128)
DEV = "cuda"
COPIES = 4                    # weight copies cycled (~2.4 GB of fp8, 4.8 of bf16)
VARIANTS = {
    "table": {},
    "p0": {"PERSISTENT": 0},
    "p2": {"PERSISTENT": 2},
    "table-behind": {"switches": {"SCALES_AHEAD": False}},
    "p2-behind": {"PERSISTENT": 2, "switches": {"SCALES_AHEAD": False}},
    "p2-s3": {"PERSISTENT": 2, "num_stages": 3},
    "p2-s5": {"PERSISTENT": 2, "num_stages": 5},
    "p2-g16": {"PERSISTENT": 2, "GROUP_M": 16},
    "p2-up": {"PERSISTENT": 2, "DOWN": {"PERSISTENT": 0}},
    "p2-down": {"DOWN": {"PERSISTENT": 2}},
    "p1-n256-s3": {"PERSISTENT": 1, "BLOCK_N": 256, "num_stages": 3},
    "p2-down-n256-w8": {"PERSISTENT": 2, "DOWN": {"BLOCK_N": 256, "num_warps": 8, "num_stages": 3}},
    # down's routing weights loaded before its K steps
    "wearly": {"DOWN": {"WEIGHTS_EARLY": True}},
    "p0-wearly": {"PERSISTENT": 0, "DOWN": {"WEIGHTS_EARLY": True}},
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", default="954,2048")
    ap.add_argument("--dtypes", default="fp8")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--ncu", action="store_true", help="run each variant twice, untimed, for Nsight Compute")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    names = args.variants.split(",")
    bandwidth = None if args.ncu else roofline()["copy_bandwidth_tb_s"]
    torch.manual_seed(0)
    rows = []
    for dtype in args.dtypes.split(","):
        fp8 = dtype == "fp8"
        w13 = [torch.randn(E, 2 * INTER, H, device=DEV, dtype=torch.bfloat16) * H ** -0.5 for _ in range(COPIES)]
        w2 = [torch.randn(E, H, INTER, device=DEV, dtype=torch.bfloat16) * INTER ** -0.5 for _ in range(COPIES)]
        ref_w = (w13[0].float(), w2[0].float())
        if fp8:
            quantized = [fp8_experts(a, b, BLOCK) for a, b in zip(w13, w2)]
            weights = [((q13, q2), {"w13_scale": s13, "w2_scale": s2, "block": BLOCK}) for q13, s13, q2, s2 in quantized]
            del w13, w2
        else:
            weights = [((a, b), {}) for a, b in zip(w13, w2)]
        floor_us = E * 3 * H * INTER * (1 if fp8 else 2) / ((bandwidth or 1) * 1e12) * 1e6
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, H, device=DEV, dtype=torch.bfloat16)
            routings = [route(torch.randn(m, E, device=DEV), A, True) for _ in range(COPIES)]
            base = lookup_config(E, INTER, H, m, x.device, BLOCK if fp8 else None)
            ref = fused_moe_reference(x.float(), *ref_w, *routings[0]) if not args.ncu else None
            for name in names:
                patch = {k: v for k, v in VARIANTS[name].items() if k != "switches"}
                cfg = {**base, **patch, "DOWN": {**base.get("DOWN", {}), **patch.get("DOWN", {})}}

                def call(i, cfg=cfg, flags=VARIANTS[name].get("switches", {})):
                    (a, b), kw = weights[i % COPIES]
                    with mock.patch.multiple(switches, **flags) if flags else contextlib.nullcontext():
                        return fused_moe(x, a, b, *routings[i % COPIES], cfg, **kw)

                row = variant_row({"dtype": dtype, "M": m, "variant": name}, call, ref, floor_us, COPIES * 2,
                                  args.ncu)
                if row is not None:
                    rows.append({**row, "config": str(cfg)} if "us" in row else row)
            against_table(rows, M=m, dtype=dtype)
    if args.ncu:
        return 0
    print_table(rows, ["dtype", "M", "variant", "us", "vs_table", "floor_us", "floor_over", "rel_err", "error"])
    write_result("moe-variants", {"bandwidth_tb_s": bandwidth, "copies": COPIES, "shape": [E, H, INTER, A],
                                  "routing": "uniform"}, rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
