"""A stand-in for benchmarks.engine under benchmarks.engine_ab's test: one row per concurrency,
its 'inter-token time' read from the norm_route table of the tree it runs in (times
ENGINE_AB_TEST_SCALE, a variant's "env"), and with --ttft-repeats a TTFT row of ten times it."""

import argparse
import json
import os

from benchmarks.common import write_result
if os.path.isdir("kernels"):       # a tree from before the kernels' package was renamed (engine_ab.OLD_KERNELS)
    from kernels.tables import CONFIG_DIR
else:
    from qwen3vl_kernels.tables import CONFIG_DIR

ap = argparse.ArgumentParser()
ap.add_argument("--concurrency", default="1")
ap.add_argument("--ttft-repeats", type=int, default=0)
ap.add_argument("--routing", default="uniform")         # as benchmarks.engine's
ap.add_argument("--out")
args = ap.parse_args()
table = json.loads((CONFIG_DIR / "norm_route,device=NVIDIA_H200.json").read_text())
scale = float(os.environ.get("ENGINE_AB_TEST_SCALE", "1"))
rows = [{"concurrency": int(c), "itl_p50_ms": float(table["2048,128"]["BLOCK_E"]) * int(c) * scale,
         "decode_step_ms": float(table["2048,128"]["num_warps"]), "config_dir": str(CONFIG_DIR),
         "routing": args.routing}
        for c in args.concurrency.split(",")]
if args.ttft_repeats:           # as benchmarks.engine's TTFT row: no concurrency
    rows.append({"kind": "ttft", "ttft_p50_ms": 10.0 * float(table["2048,128"]["BLOCK_E"]) * scale, "ttft_min_ms": 1.0})
write_result("fake-engine", {}, rows, args.out)
