"""On/off rows for the serving features, at real shapes with dummy weights.

    python -m benchmarks.features [--config Qwen3-VL-30B-A3B-Instruct]

- ViT embedding cache: ViT time for a repeated 1280x720 image, cold vs hit.
- Prefix cache: TTFT of a repeated request (same image + text), cache off vs on.
- ViT CUDA graphs: ViT time for one image, eager (sdpa or our varlen kernel) vs graph replay.
"""

import argparse
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from qwen3vl_backend.config import EngineConfig
from qwen3vl_backend.processing.chat import MediaRef
from qwen3vl_backend.engine.llm_engine import LLMEngine
from qwen3vl_backend.processing.processor import Processor
from qwen3vl_backend.sampling_params import SamplingParams
from qwen3vl_backend.engine.vision_cache import VisionCache, encode_with_cache

from .common import bundled_model_dir, image_data_uri, print_table, write_result
from .engine import make_prompt


def _ms(fn, repeat=5) -> float:
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def ttft_ms(engine: LLMEngine, prompt) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=1))
    while engine.has_unfinished():
        engine.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3


def vit_graph_rows(model_dir) -> list[dict]:
    from qwen3vl_kernels.varlen_attention import varlen_attention
    from qwen3vl_backend.engine.vision_graphs import VisionGraphs
    from qwen3vl_backend.layers.attention import varlen_attention_torch
    from qwen3vl_backend.loader import load_vision_model

    visual = load_vision_model(model_dir, torch.device("cuda"), torch.bfloat16, "dummy")
    graphs = VisionGraphs(visual)
    graphs.capture()
    processor = Processor(model_dir)
    rows = []
    for w, h in ((448, 448), (256, 256)):          # within the graphs' buckets (up to 1024 patches)
        img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))
        media = processor.load_all([MediaRef("image", image_data_uri(img))])
        pixels = torch.cat([m.pixel_values for m in media]).cuda().bfloat16()
        grids = [m.grid_thw for m in media]
        metric = f"ViT ms, {w}x{h} ({pixels.shape[0]} patches)"
        with torch.no_grad():
            for label, attn in (("eager sdpa", varlen_attention_torch), ("eager triton", varlen_attention)):
                visual.attn_fn = attn
                rows.append({"feature": "vit_cuda_graph", "on": False, "metric": f"{metric}, {label}",
                             "value": _ms(lambda: visual(pixels, grids), repeat=9)})
            want = visual(pixels, grids)[0]
            got = graphs(pixels, grids)[0]
            rel = float((got.float() - want.float()).norm() / want.float().norm())
            rows.append({"feature": "vit_cuda_graph", "on": True, "metric": f"{metric}, graph (rel diff {rel:.1e})",
                         "value": _ms(lambda: graphs(pixels, grids), repeat=9)})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="Qwen3-VL-30B-A3B-Instruct")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = bundled_model_dir(args.config, tmp)
        base = dict(model_path=str(model_dir), device="cuda", dtype="bfloat16", load_format="dummy",
                    max_model_len=4096, mem_fraction_static=0.8)
        for prefix in (False, True):
            engine = LLMEngine(EngineConfig(**base, enable_prefix_cache=prefix, vlm_cache_size_mb=100 if prefix else 0))
            processor = Processor(model_dir, engine.tokenizer)
            prompt = make_prompt(processor, 0)
            ttft_ms(engine, prompt)                                   # warm up (and fill the cache when on)
            t = sorted(ttft_ms(engine, prompt) for _ in range(5))[2]
            rows.append({"feature": "prefix_cache+vit_cache", "on": prefix, "metric": "TTFT ms, repeated image request",
                         "value": t, "prompt_tokens": len(prompt.prompt_ids)})
            if prefix:
                vit = engine.runner.run_vision
                media = prompt.media
                pixels = torch.cat([m.pixel_values for m in media])
                grids, keys = [m.grid_thw for m in media], [m.content_hash for m in media]
                cold = _ms(lambda: encode_with_cache(vit, VisionCache(0), pixels, grids, keys, 4))
                cache = VisionCache(100)
                encode_with_cache(vit, cache, pixels, grids, keys, 4)
                hit = _ms(lambda: encode_with_cache(vit, cache, pixels, grids, keys, 4))
                rows.append({"feature": "vit_cache", "on": False, "metric": "ViT ms, 1280x720", "value": cold})
                rows.append({"feature": "vit_cache", "on": True, "metric": "ViT ms, 1280x720", "value": hit})
            del engine
            torch.cuda.empty_cache()
        rows += vit_graph_rows(str(model_dir))
    print_table(rows, ["feature", "on", "metric", "value"])
    print(write_result("features", {"config": args.config, **{k: v for k, v in base.items() if k != "model_path"}},
                       rows, args.out))


if __name__ == "__main__":
    main()
