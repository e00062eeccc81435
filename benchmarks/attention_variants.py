"""Paged decode attention at a decode step's shapes (30B-A3B: 32 query / 4 KV heads, D 128, 16-token
pages) under launch variants of `qwen3vl_kernels.attention.paged_decode_attention`: each a patch over the
device table's entry ({} = the table's own), timed per call over cache copies cycled past L2 (a
step's layers each read their own cache once), against the floor of the bytes read (the cache's K
and V at its dtype, q and the output), with each variant's error against the float32 reference.
The block tables are each sequence's pages in order, or shuffled over the cache (`--shuffle`: how
a long-running engine's allocator leaves them). Each row is printed as it is measured.

    python -m benchmarks.attention_variants [--seqs 16,64,128] [--ctx 1000] [--cache bf16,fp8]
                                            [--variants a,b] [--shuffle] [--out DIR]
    python -m benchmarks.attention_variants --ncu [--seqs 128] [--variants table]

`--ncu`: each variant run twice and nothing timed, for Nsight Compute (`ncu -k regex:_paged_decode`).
"""

from __future__ import annotations

import argparse
import faulthandler

import torch

from qwen3vl_kernels.attention import (decode_config, num_splits_for, paged_decode_attention,
                                       paged_decode_attention_reference)

from .common import against_table, print_table, variant_row, write_result
from .roofline import measure as roofline

HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 4, 128, 16
CACHE_BYTES = 256 * 2**20           # cache copies cycled per timing: several times any L2
VARIANTS = {
    "table": {},
    "t32": {"PAGES_TOKENS": 32},
    "t64": {"PAGES_TOKENS": 64},
    "t128": {"PAGES_TOKENS": 128},
    "w8": {"num_warps": 8},
    "t128-w8": {"PAGES_TOKENS": 128, "num_warps": 8},
    "s2": {"num_stages": 2},
    "s3": {"num_stages": 3},
    "s4": {"num_stages": 4},
    "p32": {"target_programs": 32},
    "p128": {"target_programs": 128},
    "t32-p128": {"PAGES_TOKENS": 32, "target_programs": 128},
    "p512": {"target_programs": 512},
    "p1024": {"target_programs": 1024},
    "p2048": {"target_programs": 2048},
    "prefetch": {"prefetch": True},
    # registers capped (ptxas spills past them): the fp8 cache's 128-token tiles take 204 a thread
    # on sm_90, 2 blocks an SM; 168 makes 3 (24 bytes spilled), 128 makes 4 (136)
    "r168": {"maxnreg": 168},
    "r128": {"maxnreg": 128},
}


def inputs(seqs: int, ctx: int, fp8: bool, shuffle: bool, gen: torch.Generator, device: str = "cuda"):
    """(q, cache, block tables, context lengths): `seqs` sequences of `ctx` tokens, each in its own
    pages, the pages in order or shuffled over the cache."""
    from qwen3vl_backend.layers.attention import kv_cast

    per_seq = -(-ctx // PAGE)
    nb = seqs * per_seq
    cache = torch.randn(2, nb, PAGE, KV_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=gen)
    cache = kv_cast(cache, torch.float8_e4m3fn) if fp8 else cache
    order = torch.randperm(nb, device=device, generator=gen) if shuffle else torch.arange(nb, device=device)
    tables = order.to(torch.int32).view(seqs, per_seq)
    q = torch.randn(seqs, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=gen)
    return q, cache, tables, torch.full((seqs,), ctx, device=device, dtype=torch.int32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", default="16,64,128")
    ap.add_argument("--ctx", type=int, default=1000, help="tokens a sequence (the benchmarks' image + text: ~1 k)")
    ap.add_argument("--cache", default="bf16,fp8", help="the cache's dtypes: bf16, fp8 (float8 e4m3)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--shuffle", action="store_true", help="each sequence's pages shuffled over the cache")
    ap.add_argument("--ncu", action="store_true", help="run each variant twice, untimed, for Nsight Compute")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    faulthandler.dump_traceback_later(90, repeat=True)
    bandwidth = None if args.ncu else roofline()["copy_bandwidth_tb_s"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    dev = torch.device("cuda")
    scale = HEAD_DIM ** -0.5
    rows = []
    for kind in args.cache.split(","):
        fp8 = {"bf16": False, "fp8": True}[kind]
        for seqs in (int(v) for v in args.seqs.split(",")):
            one = 2 * seqs * args.ctx * KV_HEADS * HEAD_DIM * (1 if fp8 else 2)
            copies = 2 if args.ncu else max(2, -(-CACHE_BYTES // one))
            cases = [inputs(seqs, args.ctx, fp8, args.shuffle, gen) for _ in range(copies)]
            want = paged_decode_attention_reference(*cases[0], scale).float()
            base = decode_config(seqs, dev, KV_HEADS, HEADS // KV_HEADS, fp8)
            floor_us = (one + 2 * 2 * seqs * HEADS * HEAD_DIM) / ((bandwidth or 1) * 1e12) * 1e6
            for name in args.variants.split(","):
                patch = dict(VARIANTS[name])
                prefetch = patch.pop("prefetch", None)
                cfg = {**base, **patch}

                def call(i, cfg=cfg, prefetch=prefetch, cases=cases):
                    return paged_decode_attention(*cases[i % len(cases)], scale, config=cfg, prefetch=prefetch)

                print(f"{kind} seqs={seqs} {name} ...", flush=True)
                row = variant_row({"cache": kind, "seqs": seqs, "variant": name,
                                   "splits": num_splits_for(seqs, KV_HEADS, cfg["target_programs"])},
                                  call, want, floor_us, copies * 4, args.ncu)
                if row is not None:
                    print(row, flush=True)
                    rows.append({**row, "config": str(cfg), "prefetch": prefetch})
            against_table(rows, seqs=seqs, cache=kind)
            del cases
    if args.ncu:
        return 0
    print_table(rows, ["cache", "seqs", "variant", "splits", "us", "vs_table", "floor_us", "floor_over", "rel_err",
                       "error"])
    write_result("attention-variants", {"bandwidth_tb_s": bandwidth, "ctx": args.ctx, "shuffle": args.shuffle,
                                        "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "page": PAGE},
                 rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
