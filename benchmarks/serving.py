"""The engine benchmark's workload through the whole stack: OpenAI adapter -> Triton ensemble.

    python -m benchmarks.serving --url http://127.0.0.1:8000 --model NAME --model-dir DIR [--concurrency 1,8]

Streams each request (`--images` 1280x720 PNGs as data URIs + 64 text tokens, `max_tokens` out with
ignore_eos, greedy) and reports TTFT and inter-token latency as a client sees them. The requests
of one concurrency level carry different images (identical ones would hit the ViT and prefix
caches, which no real batch does).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import time

import httpx
import numpy as np

from qwen3vl_backend.processing.tokenizer import Tokenizer

from .common import image_data_uri, print_table, write_result
from .engine import make_request


def server_timing(header: str | None) -> dict[str, float]:
    """The adapter's Server-Timing header -> {phase: ms}."""
    out = {}
    for part in (header or "").split(","):
        name, _, dur = part.strip().partition(";dur=")
        if name and dur:
            out[name] = float(dur)
    return out


async def one(client: httpx.AsyncClient, url: str, body: bytes) -> tuple[float, list[float], str, float, dict]:
    """-> TTFT (first content), gaps between content chunks, text, time to the first SSE event,
    the adapter's own phases (ms). The body is encoded once beforehand: the client's own JSON
    encoding is not the server's time."""
    start = time.perf_counter()
    stamps, text, first_event = [], [], None
    async with client.stream("POST", f"{url}/v1/chat/completions", content=body,
                             headers={"content-type": "application/json"}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        phases = server_timing(r.headers.get("server-timing"))
        async for line in r.aiter_lines():
            if first_event is None and line.startswith("data: "):
                first_event = time.perf_counter() - start
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    stamps.append(time.perf_counter())
                    text.append(chunk["choices"][0]["delta"]["content"])
    return stamps[0] - start, list(np.diff(stamps)), "".join(text), first_event, phases


async def warm(url: str, warmup: dict) -> None:
    """One request with another image first: the measured ones find no ViT or prefix cache entry,
    and the stage times (taken after it) do not count it."""
    async with httpx.AsyncClient(timeout=600) as client:
        await one(client, url, json.dumps({**warmup, "max_tokens": 4}).encode())


async def run(url: str, bodies: list[dict]) -> dict:
    """All `bodies` at once (the concurrency is their number)."""
    payloads = [json.dumps(b).encode() for b in bodies]
    concurrency, body = len(bodies), bodies[0]
    async with httpx.AsyncClient(timeout=600) as client:
        t = time.perf_counter()
        results = await asyncio.gather(*(one(client, url, p) for p in payloads))
        wall = time.perf_counter() - t
    ttft = np.array([r[0] for r in results]) * 1e3
    itl = np.concatenate([r[1] for r in results]) * 1e3
    # the adapter's phases, and what is left of each TTFT outside them (HTTP both ways, the client)
    adapter = {f"adapter_{k}_ms": float(np.percentile([r[4].get(k, 0.0) for r in results], 50))
               for k in results[0][4]}
    if results[0][4]:
        adapter["outside_adapter_ms"] = float(np.percentile([t - sum(r[4].values()) for t, r in zip(ttft, results)], 50))
    return {"concurrency": concurrency, **adapter, "ttft_p50_ms": float(np.percentile(ttft, 50)),
            "first_event_p50_ms": float(np.percentile([r[3] * 1e3 for r in results], 50)),
            "ttft_p99_ms": float(np.percentile(ttft, 99)), "itl_p50_ms": float(np.percentile(itl, 50)),
            "itl_p99_ms": float(np.percentile(itl, 99)),
            "total_tok_s": concurrency * body["max_tokens"] / wall,
            # greedy: the first request's text identifies its output; its hash lets two runs be compared
            "text_sha256": hashlib.sha256(results[0][2].encode()).hexdigest()[:16]}


def chat_body(model: str, tokenizer, seed: int, max_tokens: int, fmt: str = "png", images: int = 1) -> dict:
    """`images` 1280x720 images (SGLang's published table: two) and ~64 text tokens."""
    parts = []
    for i in range(images):
        img, text = make_request(tokenizer, seed * 16 + i)
        parts.append({"type": "image_url", "image_url": {"url": image_data_uri(img, fmt)}})
    return {"model": model, "stream": True, "temperature": 0, "ignore_eos": True, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]}


def triton_stats(triton_http: str) -> dict[str, dict]:
    """Per-model cumulative request count and queue / compute nanoseconds from Triton."""
    stats = httpx.get(f"{triton_http}/v2/models/stats", timeout=10).json()
    out = {}
    for m in stats.get("model_stats", []):
        inf = m["inference_stats"]
        out[m["name"]] = {"count": inf["success"]["count"],
                          **{k: inf[k]["ns"] for k in ("queue", "compute_input", "compute_infer", "compute_output")}}
    return out


def stage_times(before: dict, after: dict) -> dict:
    """Average ms per request of each model between two snapshots."""
    rows = {}
    for name, a in after.items():
        b = before.get(name, {k: 0 for k in a})
        n = a["count"] - b["count"]
        if n:
            rows[name] = {k: (a[k] - b[k]) / n / 1e6 for k in a if k != "count"}
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", required=True)
    ap.add_argument("--model-dir", required=True, help="checkpoint dir (for the tokenizer)")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--out-tokens", type=int, default=128)
    ap.add_argument("--label", default="", help="recorded in the settings (e.g. keep-mm-feature-on-device)")
    ap.add_argument("--triton-http", default=None, help="Triton's HTTP URL: adds per-model times from its statistics")
    ap.add_argument("--image-format", default="png",
                    help="comma-separated: png (a 2.8 MB noise image), jpeg (the same pixels, quality 90, 0.8 MB); "
                         "formats after the first run at the lowest concurrency only")
    ap.add_argument("--images", type=int, default=1, help="1280x720 images per request (SGLang's table: 2)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="concurrency 1 only: this many requests one after another, each with new images (no cache "
                         "hit); the row is the median-TTFT request's, with the median and min beside it")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    tokenizer = Tokenizer(args.model_dir)
    rows = []
    formats = args.image_format.split(",")
    levels = [(formats[0], c) for c in args.concurrency.split(",")]
    levels += [(f, args.concurrency.split(",")[0]) for f in formats[1:]]
    for n, (fmt, c) in enumerate(levels):
        body = chat_body(args.model, tokenizer, 100 + n, args.out_tokens, fmt, args.images)
        warmup = chat_body(args.model, tokenizer, n, 4, fmt, args.images)
        asyncio.run(warm(args.url, warmup))
        before = triton_stats(args.triton_http) if args.triton_http else {}
        if int(c) == 1 and args.repeats > 1:
            runs = [asyncio.run(run(args.url, [chat_body(args.model, tokenizer, 1000 + 100 * n + r, args.out_tokens, fmt,
                                                         args.images)])) for r in range(args.repeats)]
            ttfts = sorted(r["ttft_p50_ms"] for r in runs)
            median = sorted(runs, key=lambda r: r["ttft_p50_ms"])[len(runs) // 2]
            rows.append({"image_format": fmt, **median, "ttft_median_ms": float(np.median(ttfts)),
                         "ttft_min_ms": ttfts[0], "repeats": args.repeats})
        else:
            bodies = [body] + [chat_body(args.model, tokenizer, 5000 + 1000 * n + j, args.out_tokens, fmt, args.images)
                               for j in range(1, int(c))]
            rows.append({"image_format": fmt, **asyncio.run(run(args.url, bodies))})
        if args.triton_http:       # the measured requests' average per stage
            for model, t in stage_times(before, triton_stats(args.triton_http)).items():
                if model != "llm":  # llm's compute time spans the whole decoupled stream
                    for k, v in t.items():
                        rows[-1][f"{model}_{k}_ms"] = v
    print_table(rows, list(rows[0]))
    print(write_result("serving", {"url": args.url, "model": args.model, "out_tokens": args.out_tokens,
                                   "image": "1280x720 noise", "images": args.images, "text_tokens": 64, "path": "OpenAI adapter -> Triton",
                                   "label": args.label},
                       rows, args.out))


if __name__ == "__main__":
    main()
