"""The ViT alone at real shapes (dummy weights): one image's encode, by SDPA backend order and path.

    python -m benchmarks.vit [--config Qwen3-VL-30B-A3B-Instruct] [--sizes 1280x720,1920x1080]

For each image size and each SDPA order (torch's own, cuDNN first, flash only): the first
eager call (what a new image size pays: cuDNN plans per sequence length), the steady eager
call, the exact-grid graph's capture and its replays (engine/vision_graphs.py), as milliseconds
from the uint8 rows on the GPU to the embeddings, synchronised. Also the embeddings' relative
difference from the default order's eager output.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from torch.nn.attention import SDPBackend

from qwen3vl_backend.engine.vision_graphs import VisionGraphs
from qwen3vl_backend.layers.attention import CUDNN_FIRST, sdpa_priority
from qwen3vl_backend.loader import load_vision_model
from qwen3vl_backend.processing.vision_inputs import VisionProcessingConfig, image_grid, parse_image_sizes

from .common import bundled_model_dir, print_table, write_result

ORDERS = {"default": None, "cudnn_first": CUDNN_FIRST,
          "flash_first": (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                          SDPBackend.MATH)}


def timed(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3, out


@torch.no_grad()
def rows_for(visual, pcfg, w: int, h: int, repeats: int) -> list[dict]:
    grid = image_grid(w, h, pcfg)
    n = grid[1] * grid[2]
    gen = torch.Generator(device="cuda").manual_seed(0)
    pixels = torch.randn(n, pcfg.patch_width, device="cuda", generator=gen).to(torch.bfloat16)
    rows, ref = [], None
    for name, order in ORDERS.items():
        with sdpa_priority(order):
            first, out = timed(lambda: visual(pixels, [grid]))
            eager = sorted(timed(lambda: visual(pixels, [grid]))[0] for _ in range(repeats))[repeats // 2]
        if ref is None:
            ref = out[0].float()
        rel = float((out[0].float() - ref).norm() / ref.norm())
        graphs = VisionGraphs(visual, buckets=(256,))      # no bucket graphs: the exact path only
        graphs.captured, graphs.exact_sdpa = True, order
        graphs(pixels, [grid])                              # first arrival: remembered, eager
        capture, _ = timed(lambda: graphs(pixels, [grid]))  # second: captured under `order`
        assert graphs.last_path == "capture", graphs.last_path
        replay = sorted(timed(lambda: graphs(pixels, [grid]))[0] for _ in range(repeats))[repeats // 2]
        rows.append({"image": f"{w}x{h}", "patches": n, "sdpa_order": name, "first_eager_ms": first,
                     "eager_ms": eager, "capture_ms": capture, "replay_ms": replay, "rel_diff_vs_default": rel})
    return rows


VIT_SWITCHES = ("VIT_FUSED_NORM", "VIT_GELU_EPILOGUE")


@torch.no_grad()
def switch_rows(visual, pcfg, w: int, h: int, repeats: int, variants: list[str]) -> list[dict]:
    """--switches: qwen3vl_kernels.switches' ViT variants ("base", a switch's name, or "all") in the
    order given, one process: each variant's exact-grid graph captured under cuDNN-first and
    replayed, and its eager call; the embeddings' relative difference from the first variant's."""
    from qwen3vl_kernels import switches

    grid = image_grid(w, h, pcfg)
    n = grid[1] * grid[2]
    gen = torch.Generator(device="cuda").manual_seed(0)
    pixels = torch.randn(n, pcfg.patch_width, device="cuda", generator=gen).to(torch.bfloat16)
    rows, ref = [], None
    for variant in variants:
        on = set(VIT_SWITCHES) if variant == "all" else {variant} - {"base"}
        if not on <= set(VIT_SWITCHES):
            raise SystemExit(f"--switches: base, all or one of {', '.join(VIT_SWITCHES)}, got {variant!r}")
        for name in VIT_SWITCHES:
            setattr(switches, name, name in on)
        with sdpa_priority(CUDNN_FIRST):
            eager = sorted(timed(lambda: visual(pixels, [grid]))[0] for _ in range(repeats))[repeats // 2]
        graphs = VisionGraphs(visual, buckets=(256,))
        graphs.captured, graphs.exact_sdpa = True, CUDNN_FIRST
        graphs(pixels, [grid])
        _, out = timed(lambda: graphs(pixels, [grid]))
        assert graphs.last_path == "capture", graphs.last_path
        replay = sorted(timed(lambda: graphs(pixels, [grid]))[0] for _ in range(repeats))[repeats // 2]
        if ref is None:
            ref = out[0].float()
        rows.append({"image": f"{w}x{h}", "patches": n, "variant": variant, "eager_ms": eager, "replay_ms": replay,
                     "rel_diff_vs_first": float((out[0].float() - ref).norm() / ref.norm())})
        graphs.exact.clear()                                # its graph and memory pool
        torch.cuda.empty_cache()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="Qwen3-VL-30B-A3B-Instruct")
    ap.add_argument("--sizes", default="1280x720,1920x1080,448x448")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--switches", default="",
                    help="instead of the SDPA orders: qwen3vl_kernels.switches' ViT variants in this order, comma-separated "
                         "(base, all, " + ", ".join(VIT_SWITCHES) + "), e.g. base,all,base")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    print("SDPA priority order:", torch._C._get_sdp_priority_order())
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = bundled_model_dir(args.config, tmp)
        visual = load_vision_model(str(model_dir), torch.device("cuda"), torch.bfloat16, "dummy")
        pcfg = VisionProcessingConfig.from_dir(model_dir)
        rows = []
        for w, h in parse_image_sizes(args.sizes):
            if args.switches:
                found = switch_rows(visual, pcfg, w, h, args.repeats, args.switches.split(","))
            else:
                found = rows_for(visual, pcfg, w, h, args.repeats)
            rows += found
            print_table(found, list(found[-1]))
    print(write_result("vit", {"config": args.config, "sizes": args.sizes, "repeats": args.repeats,
                               "switches": args.switches,
                               "sdpa_priority": [int(b) for b in torch._C._get_sdp_priority_order()]}, rows, args.out))


if __name__ == "__main__":
    main()
