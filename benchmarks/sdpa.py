"""SDPA's backends at the shapes the engine attends at, one backend at a time.

    python -m benchmarks.sdpa [--out DIR]

The language model's prefill (causal, grouped-query: 30B-A3B's 32 query and 4 KV heads of 128,
235B-A22B's 64 and 4) at 1024 and 2048 tokens, and the ViT's frames (bidirectional, 16 heads of
72) at a 1280x720 and a 1920x1080 image's patches, also with the head dimension zero-padded.
Each row: microseconds of one call as a CUDA graph replays it, and the relative error against
SDPA's float32 math backend. A backend that refuses the shape is a row with its error.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .common import graph_time_ms, print_table, write_result

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}
# (name, tokens, query heads, KV heads, head dim, causal, backends, zero-padded head dims)
CASES = [
    *[("30b-prefill", n, 32, 4, 128, True, ("flash", "cudnn", "efficient"), ()) for n in (1024, 2048)],
    *[("235b-prefill", n, 64, 4, 128, True, ("flash", "cudnn"), ()) for n in (1024, 2048)],
    *[("vit", n, 16, 16, 72, False, ("flash", "cudnn", "efficient"), (80, 96, 128)) for n in (3520, 8160)],
]


def measure(tokens: int, hq: int, hkv: int, d: int, causal: bool, backend: str, pad: int | None) -> dict:
    dev = torch.device("cuda")
    q, k, v = (torch.randn(tokens, h, d, device=dev, dtype=torch.bfloat16) for h in (hq, hkv, hkv))
    if pad:
        q, k, v = (F.pad(t, (0, pad - d)) for t in (q, k, v))
    # (1, heads, tokens, dim) views of (tokens, heads, dim), as layers.attention hands them over
    qt, kt, vt = (t.transpose(0, 1)[None] for t in (q, k, v))
    kw = dict(is_causal=causal, scale=d ** -0.5, enable_gqa=hq != hkv)

    def call():
        return F.scaled_dot_product_attention(qt, kt, vt, **kw)
    try:
        with sdpa_kernel([BACKENDS[backend]]):
            us = graph_time_ms(call) * 1e3
            got = call()[..., :d].float()
    except RuntimeError as e:
        return {"us": None, "rel_err": None, "error": str(e).splitlines()[0][:120]}
    with sdpa_kernel([SDPBackend.MATH]):
        want = F.scaled_dot_product_attention(*(t[..., :d].float() for t in (qt, kt, vt)), **kw)
    return {"us": us, "rel_err": ((got - want).norm() / want.norm()).item(), "error": None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = []
    with torch.no_grad():
        for name, tokens, hq, hkv, d, causal, backends, pads in CASES:
            for backend in backends:
                for pad in (None, *pads):
                    if pad and backend == "efficient":
                        continue
                    rows.append({"case": name, "tokens": tokens, "heads": f"{hq}/{hkv}", "head_dim": d,
                                 "padded_to": pad, "backend": backend,
                                 **measure(tokens, hq, hkv, d, causal, backend, pad)})
    print_table(rows, list(rows[0]))
    print(write_result("sdpa", {"dtype": "bfloat16", "timing": "CUDA graph replay, median of 20"}, rows, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
