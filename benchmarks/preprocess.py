"""The preprocess step alone, on this host's CPU: one chat request with a 1280x720 image, by stage.

    python -m benchmarks.preprocess [--config Qwen3-VL-30B-A3B-Instruct] [--repeats 20]

What the Triton `preprocess` model runs for a request (serving.preprocess.Preprocessor): parse,
fetch (a data URI, as the adapter sends it), decode, resize + patch rows, the prompt's ids and
positions. Rows per image format (the serving benchmark's noise image: PNG, JPEG at quality 90),
and with the width-keeping resize in 4 vertical strips on threads (vision_inputs.RESIZE_STRIPS) or
in one call; then the PNG's decode alone by path (png_decoders). Medians over --repeats requests,
milliseconds.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import tempfile
import time

import numpy as np
from PIL import Image

from qwen3vl_backend.processing import media, vision_inputs
from qwen3vl_backend.processing.media import MediaPolicy
from qwen3vl_backend.processing.processor import Processor
from qwen3vl_backend.serving.media_pool import MediaPool
from qwen3vl_backend.serving.preprocess import Preprocessor

from .common import bundled_model_dir, print_table, write_result


def request(fmt: str, seed: int) -> tuple[str, list[str]]:
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (720, 1280, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    uri = f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()
    chat = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "media-input:0"}},
                                                      {"type": "text", "text": "Describe the image. " * 8}]}]}
    return json.dumps(chat), [uri]


def png_decoders(repeats: int) -> list[dict]:
    """The noise PNG's decode, by path: the host's (decode_image_array with its CRC walk: libdeflate's
    inflate, then pyspng unfiltering stored blocks; and pyspng alone, as without libdeflate, though
    its CRC walk keeps libdeflate's crc32, bound at import),
    and libdeflate's inflate alone. Medians, milliseconds."""
    data = base64.b64decode(request("PNG", 0)[1][0].split(",", 1)[1])
    stream = media.png_image_data(data)

    def pyspng_alone():
        keep, media.deflate = media.deflate, None
        try:
            media.decode_image_array(data)
        finally:
            media.deflate = keep
    paths = {"host (libdeflate + pyspng)": lambda: media.decode_image_array(data), "host (pyspng)": pyspng_alone}
    if media.deflate is not None:
        paths["libdeflate inflate"] = lambda: media.deflate.zlib_decompress(stream, 720 * (1 + 1280 * 3))
    rows = []
    for name, fn in paths.items():
        times = []
        for _ in range(repeats + 1):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        rows.append({"png_decode": name, "ms": float(np.median(times[1:]))})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="Qwen3-VL-30B-A3B-Instruct")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pre = Preprocessor(Processor(bundled_model_dir(args.config, tmp)), MediaPolicy(), MediaPool(8, 10))
        for fmt in ("JPEG", "PNG"):
            bodies = [request(fmt, seed) for seed in range(args.repeats)]
            for strips in (4, 1):
                saved, vision_inputs.RESIZE_STRIPS = vision_inputs.RESIZE_STRIPS, strips
                try:
                    times = []
                    for text, uris in [bodies[0]] + bodies:          # the first one warms up
                        timing = {}
                        t = time.perf_counter()
                        pre.run(text, [], "", timing=timing, media=uris)
                        item = timing["items"][0]
                        times.append({"total_ms": (time.perf_counter() - t) * 1e3, "parse_ms": timing["parse"],
                                      "decode_ms": item["decode"], "process_ms": item["process"],
                                      "finish_ms": timing["finish"]})
                finally:
                    vision_inputs.RESIZE_STRIPS = saved
                rows.append({"format": fmt, "resize_strips": strips,
                             **{k: float(np.median([x[k] for x in times[1:]])) for k in times[0]}})
                print_table(rows[-1:], list(rows[-1]))
        pre.pool.shutdown()
    png = png_decoders(args.repeats)
    print_table(png, list(png[0]))
    print_table(rows, list(rows[0]))
    print(write_result("preprocess", {"config": args.config, "repeats": args.repeats, "image": "1280x720 noise",
                                      "simplejpeg": media.simplejpeg is not None, "pyspng": media.pyspng is not None},
                       rows + png, args.out))


if __name__ == "__main__":
    main()
