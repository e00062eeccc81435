"""The fp8 projections at decode batches (30B-A3B's qkv and o_proj, 16 and 64 rows) under launch
variants of the one-expert grouped GEMM (`qwen3vl_kernels.fused_moe.dense_fp8_gemm`): each a patch over
the device table's entry ({} = the table's own), timed per call over weight copies cycled past L2
(a decode step reads each layer's weights once), against the bytes' floor, with each variant's
error against the dequantized product and whether two runs of it give the same bits ("repeats").
Each row is printed as it is measured, and a launch that hangs prints its stack every 90 s.
The `gluon-*` variants are qwen3vl_kernels.gluon_dense's launch shapes. (The thirty-fourth session's
TILE_SCALE variants, in `results/dense-moe-decode-34/`, and the thirty-fifth's warp-specialized
kernel, in `results/dense-ws-35/`, went with their code.)

    python -m benchmarks.dense_variants [--ms 16,64] [--shapes qkv,o_proj] [--variants a,b] [--out DIR]
    python -m benchmarks.dense_variants --ncu [--ms 64] [--variants table]

`--ncu`: each variant run twice and nothing timed, for Nsight Compute (`ncu -k regex:_grouped_gemm`).
"""

from __future__ import annotations

import argparse
import faulthandler

import torch

from qwen3vl_kernels.fp8 import dense_config, dequantize_weight_blocks, quantize_weight_blocks
from qwen3vl_kernels.fused_moe import dense_fp8_gemm

from .common import against_table, print_table, variant_row, write_result
from .roofline import measure as roofline

SHAPES = {"qkv": (5120, 2048), "o_proj": (2048, 4096)}
BLOCK = (128, 128)
COPIES = 8
VARIANTS = {
    "table": {},
    # W8A8 (A8) and W8A16 by BITS's integer ops, at narrower tiles and K split over programs
    "a8-n32": {"A8": True, "BITS": False, "BLOCK_N": 32},
    "a8-n64-k2": {"A8": True, "BITS": False, "BLOCK_N": 64, "SPLIT_K": 2},
    "bits-n64-k4": {"A8": False, "BITS": True, "BLOCK_N": 64, "SPLIT_K": 4},
    "bits-n64-k4-swap": {"A8": False, "BITS": True, "BLOCK_N": 64, "SPLIT_K": 4, "SWAP_AB": True},
    # qwen3vl_kernels.gluon_dense (W8A8, each step's wgmma overlapping the last one's scaling): weight rows a
    # program, K split, tiles in flight (num_stages), warps
    "gluon-n64-s4": {"GLUON": {"BLOCK_N": 64, "SPLIT_K": 1, "num_stages": 4, "num_warps": 4}},
    "gluon-n64-s8": {"GLUON": {"BLOCK_N": 64, "SPLIT_K": 1, "num_stages": 8, "num_warps": 4}},
    "gluon-n64-s12": {"GLUON": {"BLOCK_N": 64, "SPLIT_K": 1, "num_stages": 12, "num_warps": 4}},
    "gluon-n64-s16": {"GLUON": {"BLOCK_N": 64, "SPLIT_K": 1, "num_stages": 16, "num_warps": 4}},
    "gluon-n64-k2-s6": {"GLUON": {"BLOCK_N": 64, "SPLIT_K": 2, "num_stages": 6, "num_warps": 4}},
    "gluon-n64-k2-s8": {"GLUON": {"BLOCK_N": 64, "SPLIT_K": 2, "num_stages": 8, "num_warps": 4}},
    "gluon-n64-k2-s12": {"GLUON": {"BLOCK_N": 64, "SPLIT_K": 2, "num_stages": 12, "num_warps": 4}},
    "gluon-n128-s8": {"GLUON": {"BLOCK_N": 128, "SPLIT_K": 1, "num_stages": 8, "num_warps": 8}},
    "gluon-n128-k2-s6": {"GLUON": {"BLOCK_N": 128, "SPLIT_K": 2, "num_stages": 6, "num_warps": 8}},
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", default="16,64")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--ncu", action="store_true", help="run each variant twice, untimed, for Nsight Compute")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    faulthandler.dump_traceback_later(90, repeat=True)       # where a hung launch waits, every 90 s
    bandwidth = None if args.ncu else roofline()["copy_bandwidth_tb_s"]
    torch.manual_seed(0)
    dev = torch.device("cuda")
    rows = []
    for shape in args.shapes.split(","):
        n, k = SHAPES[shape]
        weights = [tuple(t.to(dev) for t in quantize_weight_blocks(torch.randn(n, k) * k ** -0.5, BLOCK))
                   for _ in range(COPIES)]
        for m in (int(v) for v in args.ms.split(",")):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            want = x.float() @ dequantize_weight_blocks(*weights[0], BLOCK).T
            base = dense_config(n, k, m, BLOCK, dev) or {"BLOCK_M": 16 if m <= 16 else 64, "BLOCK_N": 64,
                                                         "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4,
                                                         "num_stages": 4}
            floor_us = (n * k + 2 * m * (n + k)) / ((bandwidth or 1) * 1e12) * 1e6
            for name in args.variants.split(","):
                cfg = {**base, **VARIANTS[name]}
                cfg["BLOCK_M"] = min(cfg["BLOCK_M"], 16 if m <= 16 else 64)

                def call(i, cfg=cfg):
                    return dense_fp8_gemm(x, *weights[i % COPIES], BLOCK, cfg)

                print(f"{shape} M={m} {name} ...", flush=True)
                row = variant_row({"shape": shape, "M": m, "variant": name}, call, want, floor_us, COPIES * 2,
                                  args.ncu)
                if row is not None:
                    if "us" in row:     # a schedule that races shows as two runs' outputs that differ
                        row["repeats"] = bool(torch.equal(call(0), call(0)))
                    print(row, flush=True)
                    rows.append({**row, "config": str(cfg)} if "us" in row else row)
            against_table(rows, M=m, shape=shape)
    if args.ncu:
        return 0
    print_table(rows, ["shape", "M", "variant", "us", "vs_table", "floor_us", "floor_over", "rel_err", "repeats", "error"])
    write_result("dense-variants", {"bandwidth_tb_s": bandwidth, "copies": COPIES, "block": BLOCK}, rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
