"""Engine decode and TTFT at real shapes with dummy weights: the issue's serving workload.

    python -m benchmarks.engine [--config Qwen3-VL-30B-A3B-Instruct] [--concurrency 1,8,32,64,128]

Each request: one 1280x720 image + 64 text tokens in, 256 tokens out (ignore_eos, greedy),
prefix cache off (every request pays its own prefill). Reports TTFT and inter-token latency
p50/p99, per-stream and total decode tok/s, and each decode step's floor: bytes of attention,
norm and head weights + the distinct experts the batch's step routes to (measured on the same
requests; greedy decoding of dummy weights routes far from uniformly, so the expected count
under uniform routing is reported beside it) + the KV cache read, over measured bandwidth.
Every request carries its own image (identical prompts would decode identical tokens).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from qwen3vl_backend.config import EngineConfig
from qwen3vl_backend.engine.llm_engine import LLMEngine
from qwen3vl_backend.model_config import ModelConfig
from qwen3vl_backend.processing.processor import Processor
from qwen3vl_backend.sampling_params import SamplingParams

from .common import RESULTS, bundled_model_dir, image_data_uri, print_table, write_result
from .roofline import measure as roofline

def make_request(tokenizer, seed: int) -> tuple[Image.Image, str]:
    """The workload's request: a 1280x720 image and 64 text tokens."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (720, 1280, 3), dtype=np.uint8))
    words = " ".join(f"w{i}" for i in range(40))
    return img, tokenizer.decode(tokenizer.encode(words)[:64])


def make_prompt(processor: Processor, seed: int, images: int = 1):
    parts = []
    for i in range(images):
        img, text = make_request(processor.tokenizer, seed + 7919 * i)
        parts.append({"type": "image_url", "image_url": {"url": image_data_uri(img)}})
    return processor.process_messages([{"role": "user", "content": [*parts, {"type": "text", "text": text}]}])


def ttft_rows(engine: LLMEngine, processor: Processor, repeats: int, images: list[int], compare_prefill: bool,
              compare_vit: bool) -> list[dict]:
    """TTFT of one request alone (its ViT, then its prefill), `repeats` times each, as configured
    and, with `compare_*`, with the prefill or the ViT eager (their CUDA graphs set aside), at the
    same commit."""
    runner = engine.runner
    prefill, vit = runner.prefill_graphs, runner.vision_graphs
    modes = [(prefill, vit)]
    if compare_prefill and prefill is not None:
        modes.append((None, vit))
    if compare_vit and vit is not None:
        modes.append((prefill, None))
    rows = []
    try:
        for n in images:
            prompt = make_prompt(processor, 1000 + n, n)
            for p, v in modes:
                runner.prefill_graphs, runner.vision_graphs = p, v
                for _ in range(2):          # warm: this prompt's shapes (the ViT's grids are captured on a second arrival)
                    run(engine, [prompt], 2)
                ms = [run(engine, [prompt], 2)["ttft_p50_ms"] for _ in range(repeats)]
                rows.append({"kind": "ttft", "images": n, "prompt_tokens": len(prompt.prompt_ids),
                             "prefill": "graph" if p is not None else "eager", "vit": "graph" if v is not None else "eager",
                             "ttft_p50_ms": float(np.median(ms)), "ttft_min_ms": min(ms), "repeats": repeats})
                print_table([rows[-1]], list(rows[-1]))
    finally:
        runner.prefill_graphs, runner.vision_graphs = prefill, vit
    return rows


def decode_floor_bytes(cfg: ModelConfig, batch: int, kv_tokens: int, hit: float | None = None,
                       kv_bytes: int = 2) -> float:
    """`hit`: distinct experts per layer in a step (measured); None: expected under uniform routing.
    An fp8 checkpoint reads its projections and experts at one byte per weight (plus a float32
    scale per 128x128 block); the router, norms and head stay bf16. The KV cache is `kv_bytes` a
    value (1 with --kv-cache-dtype fp8_e4m3)."""
    t = cfg.text
    wbytes = 1.0 + 4.0 / (cfg.quant.block[0] * cfg.quant.block[1]) if cfg.quant is not None else 2.0
    attn = t.hidden_size * (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim + \
        t.num_attention_heads * t.head_dim * t.hidden_size
    norms = 2 * t.hidden_size + 2 * t.head_dim
    router = t.num_experts * t.hidden_size
    expert = 3 * t.hidden_size * t.moe_intermediate_size
    if hit is None:
        hit = t.num_experts * (1 - (1 - t.num_experts_per_tok / t.num_experts) ** batch)
    quantized = t.num_hidden_layers * (attn + hit * expert)
    bf16 = t.num_hidden_layers * (norms + router) + t.vocab_size * t.hidden_size + t.hidden_size
    kv = kv_tokens * t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim
    return wbytes * quantized + 2.0 * bf16 + kv_bytes * kv


def start_decoding(engine: LLMEngine, prompts, params: SamplingParams, tag: str, tokens: int) -> list[str]:
    """Add the prompts as requests and step until each has `tokens` output tokens; -> their ids."""
    ids = [engine.add_request(p, params, request_id=f"{tag}{i}") for i, p in enumerate(prompts)]
    done = dict.fromkeys(ids, 0)
    while min(done.values()) < tokens:
        for out in engine.step():
            done[out.request_id] = out.num_output_tokens
    return ids


def experts_hit(engine: LLMEngine, prompts, temperature: float = 0.0, after: int = 32, steps: int = 2) -> float:
    """Mean distinct experts per MoE layer in one decode step of this batch, `after` tokens in:
    the routing of the benchmark's own requests (greedy decoding of dummy weights routes far from
    uniformly), measured eagerly with a recording router."""
    from qwen3vl_backend.layers.moe import SparseMoE

    params = SamplingParams(temperature=temperature, max_tokens=after + steps + 8, ignore_eos=True)
    ids = start_decoding(engine, prompts, params, "hits", after)
    seen: list[int] = []
    moes = [m for m in engine.runner.model.modules() if isinstance(m, SparseMoE)]
    originals = [(m.route_fn, m.norm_route_fn) for m in moes]

    def recording(route):
        def fn(logits, top_k, renormalize, **ep):
            seen.append(int(route(logits, top_k, renormalize)[1].unique().numel()))   # the layer's ids, all ranks'
            return route(logits, top_k, renormalize, **ep)
        return fn

    graphs, engine.runner.graphs = engine.runner.graphs, None
    try:
        for m in moes:            # unfused, so that every routing goes through route_fn
            m.route_fn, m.norm_route_fn = recording(m.route_fn), None
        for _ in range(steps):
            engine.step()
    finally:
        engine.runner.graphs = graphs
        for m, (route, norm_route) in zip(moes, originals):
            m.route_fn, m.norm_route_fn = route, norm_route
        for rid in ids:
            engine.abort(rid)
    return sum(seen) / max(len(seen), 1)


# structured output that cannot close within the benchmark's tokens (the grammar allows no EOS
# before 2000 items): each step's mask is computed inside a JSON string, where nearly the whole
# vocabulary is allowed
LONG_JSON = {"type": "object", "properties": {"notes": {"type": "array", "items": {"type": "string"},
                                                         "minItems": 2000}}, "required": ["notes"]}


def run(engine: LLMEngine, prompts, out_tokens: int, temperature: float = 0.0, structured: bool = False,
        top_p: float = 1.0, top_k: int = 0) -> dict:
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=out_tokens, ignore_eos=True)
    if structured:
        params = dataclasses.replace(params, structured_output={"json_schema": LONG_JSON})
    t0 = time.perf_counter()
    arrive = {}
    for i, p in enumerate(prompts):
        rid = engine.add_request(p, params, request_id=f"b{i}")
        arrive[rid] = t0
    torch.cuda.synchronize()
    first, stamps, steps = {}, {rid: [] for rid in arrive}, []
    while engine.has_unfinished():
        s0 = time.perf_counter()
        outs = engine.step()        # returns once these tokens are on the host: no sync needed
        now = time.perf_counter()
        decoding = [o for o in outs if o.num_output_tokens > 1]
        if decoding and len(decoding) == len(outs):
            steps.append((now - s0, len(decoding)))
        for o in outs:
            first.setdefault(o.request_id, now)
            stamps[o.request_id].append(now)
    ttft = np.array([first[r] - arrive[r] for r in arrive]) * 1e3
    itl = np.concatenate([np.diff(v) for v in stamps.values()]) * 1e3
    decode_time = sum(dt for dt, _ in steps)
    decode_tokens = sum(n for _, n in steps)
    return {"ttft_p50_ms": float(np.percentile(ttft, 50)), "ttft_p99_ms": float(np.percentile(ttft, 99)),
            "ttft_mean_ms": float(ttft.mean()),
            "itl_p50_ms": float(np.percentile(itl, 50)), "itl_p99_ms": float(np.percentile(itl, 99)),
            "per_stream_tok_s": 1e3 / float(np.percentile(itl, 50)),
            "total_decode_tok_s": decode_tokens / decode_time if decode_time else 0.0,
            "decode_step_ms": 1e3 * decode_time / max(len(steps), 1), "prompt_tokens": len(getattr(prompts[0], "prompt_ids", prompts[0]))}


def end_increments(seq) -> list[float]:
    """Each kernel's end past the later of its start and the latest end of the kernels before it
    (us, never negative). With PDL a kernel starts early and waits inside, so durations overlap;
    a chain's time is what each kernel's end adds. These and the idle gaps (no kernel running)
    sum to the span."""
    out, latest = [], None
    for e in seq:
        start, end = e.time_range.start, e.time_range.end
        out.append(max(end - (start if latest is None else max(latest, start)), 0.0))
        latest = end if latest is None else max(latest, end)
    return out


def idle_gaps(seq, steps: int, top: int = 10) -> str:
    """Where the device idles (no kernel running, `seq` in start order), by the kernel whose end
    began the idle time and the one that ended it: their sum a step, how often, the largest."""
    by_pair: dict[tuple[str, str], list[float]] = {}
    latest, latest_name = None, None
    for e in seq:
        if latest is not None and e.time_range.start > latest:
            by_pair.setdefault((latest_name, e.name), []).append(e.time_range.start - latest)
        if latest is None or e.time_range.end > latest:
            latest, latest_name = e.time_range.end, e.name
    out = [f"idle time by the kernels around it, a step (top {top}):\n"]
    for (a, b), got in sorted(by_pair.items(), key=lambda kv: -sum(kv[1]))[:top]:
        out.append(f"  {sum(got) / steps:9.1f} us  {len(got) / steps:6.1f} a step  max {max(got):7.1f} us  "
                   f"{a[:45]} -> {b[:45]}\n")
    return "".join(out)


def kernel_timeline(kernels, steps: int, rows: int = 60, top: int = 15) -> str:
    """Where a step's GPU time goes between kernels: the span from first start to last end on one
    device, the kernels' busy time, and the idle gaps; what each kernel name's ends add to the span
    a step (end_increments: the critical path, PDL or not); then one stretch of the sequence (start
    offset, duration, gap before it, end past the ends before it), kernel by kernel."""
    if not kernels:
        return ""
    device = kernels[0].device_index
    seq = sorted((e for e in kernels if e.device_index == device), key=lambda e: e.time_range.start)
    span = seq[-1].time_range.end - seq[0].time_range.start
    busy = sum(e.time_range.elapsed_us() for e in seq)
    gaps = [max(b.time_range.start - a.time_range.end, 0) for a, b in zip(seq, seq[1:])]
    adds = end_increments(seq)
    out = [f"device {device}: span {span / steps / 1e3:.3f} ms a step, kernels {busy / steps / 1e3:.3f} ms, "
           f"idle gaps {sum(gaps) / steps / 1e3:.3f} ms ({len(seq) / steps:.0f} kernels a step; "
           f"overlapping kernels make busy + gaps exceed the span)\n"]
    by_name: dict[str, list[float]] = {}
    for e, add in zip(seq, adds):
        by_name.setdefault(e.name, []).append(add)
    out.append(f"what each kernel's end adds to the span, a step (top {top}):\n")
    for name, got in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]:
        out.append(f"  {sum(got) / steps:9.1f} us  {len(got) / steps:6.1f} a step  {sum(got) / len(got):7.2f} us each  "
                   f"{name[:70]}\n")
    out.append(idle_gaps(seq, steps, top))
    mid = len(seq) // 2
    t0 = seq[mid].time_range.start
    for e, gap, add in zip(seq[mid:mid + rows], gaps[mid - 1:mid - 1 + rows], adds[mid:mid + rows]):
        out.append(f"  {e.time_range.start - t0:9.1f} us  {e.time_range.elapsed_us():8.1f} us  gap {gap:6.1f}  "
                   f"ends +{add:6.1f}  {e.name[:70]}\n")
    return "".join(out)


def decode_params(args) -> SamplingParams:
    """The sampling of --replay-timing's and --profile's steps: the run's --temperature / --top-p /
    --top-k (greedy by default), as the rows take them."""
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=64,
                          ignore_eos=True)


def replay_timing(engine: LLMEngine, prompts, params: SamplingParams, replays: int = 50) -> dict:
    """The decode step's GPU time alone: its CUDA graph (for this many sequences, decoding, their
    inputs as the last step left them) replayed back to back, against the engine's whole step
    (host scheduling, input copies, sampling under `params`, detokenizing) over the same tokens.
    Replays rewrite each sequence's newest K/V slot with the same values; the requests are aborted
    after."""
    graphs = engine.runner.graphs
    if graphs is None or not graphs.fits(len(prompts)):
        return {}
    ids = start_decoding(engine, prompts, params, "replay", 8)
    steps = []
    for _ in range(16):
        t = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t)
    graph = graphs.graphs[next(s for s in graphs.sizes if s >= len(prompts))][0]
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    for rid in ids:
        engine.abort(rid)
    step_ms = float(np.median(steps)) * 1e3
    replay_ms = start.elapsed_time(end) / replays
    return {"concurrency": len(prompts), "engine_step_ms": step_ms, "graph_replay_ms": replay_ms,
            "outside_graph_ms": step_ms - replay_ms}


def profile_decode(engine: LLMEngine, prompts, out_dir: Path, params: SamplingParams, steps: int = 8) -> None:
    """GPU time per kernel over `steps` decode steps of this batch (CUDA graph replays included),
    sampled under `params`."""
    from torch.profiler import ProfilerActivity, profile

    ids = start_decoding(engine, prompts, params, "prof", 2)         # every sequence past its prefill
    torch.cuda.synchronize()
    wall = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - wall) / steps * 1e3
    for rid in ids:
        engine.abort(rid)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    head = (f"{steps} decode steps, concurrency {len(prompts)}: {len(kernels)} GPU kernels "
            f"({len(kernels) / steps:.0f} per step), GPU busy {sum(e.device_time for e in kernels) / steps / 1e3:.2f} ms "
            f"per step of {wall:.2f} ms (profiled)\n")
    head += kernel_timeline(kernels, steps)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"profile-decode-c{len(prompts)}-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    path.write_text(head + table)
    print(head + table)


def profile_prefill(engine: LLMEngine, prompt, out_dir: Path, images: int = 1) -> None:
    """GPU time per kernel from a request's arrival to its first token: the ViT, then the prefill."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    wall = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True), "prefill")
        while not any(o.request_id == rid for o in engine.step()):
            pass
        torch.cuda.synchronize()
    wall = (time.perf_counter() - wall) * 1e3
    engine.abort(rid)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    head = (f"one request to its first token ({len(prompt.prompt_ids)} prompt tokens, {images} 1280x720 image(s)): "
            f"{len(kernels)} GPU kernels, GPU busy {sum(e.device_time for e in kernels) / 1e3:.2f} ms of "
            f"{wall:.2f} ms (profiled)\n")
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=45)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"profile-prefill-{time.strftime('%Y%m%d-%H%M%S')}.txt").write_text(head + table)
    print(head + table)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="Qwen3-VL-30B-A3B-Instruct")
    ap.add_argument("--concurrency", default="1,8,32,64,128")
    ap.add_argument("--out-tokens", type=int, default=256)
    ap.add_argument("--mem-fraction-static", type=float, default=0.88)
    ap.add_argument("--chunked-prefill-size", type=int, default=8192)
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="sampled decoding spreads the routing the way real weights do; greedy on dummy weights does not")
    ap.add_argument("--top-p", type=float, default=1.0,
                    help="with --temperature: the rows' top_p (Qwen3-VL's generation config: 0.8)")
    ap.add_argument("--top-k", type=int, default=0,
                    help="with --temperature: the rows' top_k (Qwen3-VL's generation config: 20)")
    ap.add_argument("--routing", default="uniform",
                    help="uniform (seeded top-k, as a real checkpoint routes: the headline), measured (the dummy "
                         "weights' own routing)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile 8 decode steps at concurrency 1 and the largest: per-kernel GPU time, to "
                         "DIR/profile-*.txt")
    ap.add_argument("--profile-at", default="", help="with --profile: the concurrencies to profile instead, e.g. 16,64")
    ap.add_argument("--replay-timing", action="store_true",
                    help="also time each concurrency's decode graph replayed back to back against the engine's step")
    ap.add_argument("--profile-prefill", action="store_true",
                    help="also profile one request from arrival to first token (ViT + prefill)")
    ap.add_argument("--compare-overlap", action="store_true",
                    help="also run the lowest and highest concurrency with the overlap scheduler off")
    ap.add_argument("--structured", action="store_true",
                    help="also run each concurrency with every request under a JSON schema: the grammar's cost per step")
    ap.add_argument("--ttft-repeats", type=int, default=0,
                    help="also time one request alone this many times (TTFT rows; median and min)")
    ap.add_argument("--ttft-images", default="1", help="images per TTFT request, comma-separated (1,2)")
    ap.add_argument("--compare-prefill-graph", action="store_true",
                    help="TTFT rows with the prefill CUDA graphs and without them (eager prefill)")
    ap.add_argument("--enable-vit-cuda-graph", action="store_true", help="the engine's ViT replays CUDA graphs")
    ap.add_argument("--compare-vit-graph", action="store_true",
                    help="TTFT rows with the ViT eager too (with --enable-vit-cuda-graph)")
    ap.add_argument("--burst", type=int, default=0,
                    help="instead: after the serving warm-up (LLMEngine.warm_up) alone, this many image requests at "
                         "once, twice: TTFT and the Triton kernels each burst compiled (set TRITON_CACHE_DIR to an "
                         "empty directory for a new machine's first start)")
    ap.add_argument("--burst-warm-up", default="traffic", choices=["traffic", "singles"],
                    help="with --burst: warm_up's concurrent-traffic steps, or its single prompts only")
    ap.add_argument("--enable-mixed-chunk", action="store_true",
                    help="new prompts join the decoding steps (no solo_prefill steps; the launcher's flag)")
    ap.add_argument("--prefill-graph-max-seqs", type=int, default=None,
                    help="new prompts packed into one prefill graph step (the engine's default if unset; 1: one each)")
    ap.add_argument("--prefill-pack-max-tokens", type=int, default=None,
                    help="and their tokens at most (the engine's default if unset; 0: no packing)")
    ap.add_argument("--burst-text-tokens", type=int, default=0,
                    help="with --burst: text prompts of this many tokens each instead of the image requests")
    ap.add_argument("--prefill-graph-times", action="store_true",
                    help="instead: each captured prefill graph's replay time, one prompt's and packed, by bucket")
    ap.add_argument("--kv-cache-dtype", default="auto", help="auto (bf16) or fp8_e4m3: the KV cache's elements")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (one GPU each)")
    ap.add_argument("--ep", type=int, default=1, help="expert-parallel groups within them")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    ceil = roofline()
    torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = bundled_model_dir(args.config, tmp)
        routings = args.routing.split(",")
        if len(routings) != 1 or routings[0] not in ("uniform", "measured"):
            raise SystemExit(f"--routing: uniform or measured, got {args.routing!r}")
        settings = dict(model_path=str(model_dir), device="cuda", dtype="bfloat16", load_format="dummy",
                        max_model_len=4096, max_num_seqs=128, max_num_batched_tokens=args.chunked_prefill_size,
                        mem_fraction_static=args.mem_fraction_static, enable_prefix_cache=False,
                        tp_size=args.tp, ep_size=args.ep, enable_vit_cuda_graph=args.enable_vit_cuda_graph,
                        moe_routing="uniform" if routings[0] == "uniform" else "model",
                        solo_prefill=not args.enable_mixed_chunk, kv_cache_dtype=args.kv_cache_dtype)
        if args.prefill_graph_max_seqs is not None:
            settings["prefill_cuda_graph_max_seqs"] = args.prefill_graph_max_seqs
        if args.prefill_pack_max_tokens is not None:
            settings["prefill_pack_max_tokens"] = args.prefill_pack_max_tokens
        t = time.perf_counter()
        engine = LLMEngine(EngineConfig(**settings))
        load_s = time.perf_counter() - t
        weights_gib = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters()) / 2**30
        processor = Processor(model_dir, engine.tokenizer)
        print(f"loaded {args.config} (dummy) in {load_s:.1f}s; weights {weights_gib:.1f} GiB; KV blocks "
              f"{engine.runner.num_blocks}; GPU memory {torch.cuda.memory_allocated() / 2**30:.1f} GiB")
        if args.burst or args.prefill_graph_times:
            (burst if args.burst else graph_times)(args, settings, engine, processor, weights_gib, ceil, load_s)
            engine.close()
            return
        base = make_prompt(processor, 0)
        run(engine, [base], 8)                                     # warm up kernels and allocator
        # distinct images: identical prompts would decode identical tokens and route every
        # sequence to the same experts, which no real batch does
        prompts = [base] + [make_prompt(processor, i) for i in range(1, max(int(x) for x in args.concurrency.split(",")))]
        run(engine, prompts, 4)             # every prefill shape compiled before anything is timed
        rows = []
        levels = [(int(x), True) for x in args.concurrency.split(",")]
        if args.compare_overlap:
            levels += [(c, False) for c in sorted({levels[0][0], levels[-1][0]})]
        for routing in routings:
            for c, overlap in levels:
                engine.cfg.overlap_schedule = overlap
                r = run(engine, prompts[:c], args.out_tokens, args.temperature, top_p=args.top_p, top_k=args.top_k)
                kv = c * (r["prompt_tokens"] + args.out_tokens // 2)
                hit = experts_hit(engine, prompts[:c], args.temperature)
                # under tp each GPU reads its 1/tp of the bytes (heads, vocabulary, expert slices or groups)
                kvb = engine.cfg.kv_torch_dtype.itemsize
                floor_ms = decode_floor_bytes(engine.runner.model_cfg, c, kv, hit, kvb) / args.tp / (ceil["copy_bandwidth_tb_s"] * 1e12) * 1e3
                uniform_ms = decode_floor_bytes(engine.runner.model_cfg, c, kv, kv_bytes=kvb) / args.tp / (ceil["copy_bandwidth_tb_s"] * 1e12) * 1e3
                r.update(routing=routing, concurrency=c, overlap_schedule=overlap, experts_hit=hit, floor_step_ms=floor_ms,
                         floor_over_step=floor_ms / r["decode_step_ms"], uniform_routing_floor_ms=uniform_ms, tp=args.tp,
                         ep=args.ep, kv_cache_dtype=engine.cfg.kv_cache_dtype, kv_blocks=engine.runner.num_blocks)
                rows.append(r)
                print_table([r], list(r))
                if args.structured and overlap:
                    g = run(engine, prompts[:c], args.out_tokens, args.temperature, structured=True)
                    g.update(routing=routing, concurrency=c, overlap_schedule=overlap, structured="json_schema",
                             grammar_cost=g["decode_step_ms"] / r["decode_step_ms"] - 1, tp=args.tp, ep=args.ep)
                    rows.append(g)
                    print_table([g], list(g))
        ttft = []
        if args.ttft_repeats > 0:
            ttft = ttft_rows(engine, processor, args.ttft_repeats, [int(x) for x in args.ttft_images.split(",")],
                             args.compare_prefill_graph, args.compare_vit_graph)
        # the rows are written before the profiles, which a caller's time limit may cut short
        report(args, settings, rows, ttft, weights_gib, ceil, load_s)
        if args.replay_timing and args.tp == 1:
            replay = [replay_timing(engine, prompts[:c], decode_params(args)) for c, _ in levels]
            replay = [r for r in replay if r]
            if replay:
                print_table(replay, list(replay[0]))
                print(write_result("engine-replay", {**settings, "config": args.config}, replay, args.out))
        if args.profile_prefill:          # the largest --ttft-images request (one image without --ttft-repeats)
            n = max(int(x) for x in args.ttft_images.split(",")) if args.ttft_repeats > 0 else 1
            # images no request brought before: the ViT's embedding cache would skip the encoder
            profile_prefill(engine, make_prompt(processor, 2000, n), Path(args.out or RESULTS), n)
        if args.profile:
            at = args.profile_at or f"1,{max(int(x) for x in args.concurrency.split(','))}"
            for c in sorted({int(x) for x in at.split(",")}):
                profile_decode(engine, prompts[:c], Path(args.out or RESULTS), decode_params(args))
    engine.cfg.overlap_schedule = True
    engine.close()


def burst(args, settings: dict, engine: LLMEngine, processor: Processor, weights_gib: float, ceil: dict,
          load_s: float) -> None:
    """--burst: what the first concurrent requests after a start meet (the serving warm-up only)."""
    from qwen3vl_kernels.jit_cache import compiled_kernels

    t = time.perf_counter()
    engine.warm_up(traffic=args.burst_warm_up == "traffic")
    warm_s = time.perf_counter() - t
    if args.burst_text_tokens:          # distinct ordinary ids (no prefix shared)
        span = min(engine.vocab_size, 100_000) - 1000
        prompts = [[1000 + (j * 7919 + i * 104729) % span for j in range(args.burst_text_tokens)]
                   for i in range(args.burst)]
    else:
        prompts = [make_prompt(processor, 100 + i) for i in range(args.burst)]
    rows = []
    graphs = engine.runner.prefill_graphs
    for n in (1, 2):
        before, packs = compiled_kernels(), graphs.packed_replays if graphs is not None else 0
        r = run(engine, prompts, 8)
        rows.append({"kind": "burst", "burst": n, "requests": args.burst, "warm_up": args.burst_warm_up,
                     "warm_up_s": warm_s, "ttft_p50_ms": r["ttft_p50_ms"], "ttft_p99_ms": r["ttft_p99_ms"],
                     "ttft_mean_ms": r["ttft_mean_ms"], "kernels_compiled": compiled_kernels() - before,
                     "prompt_tokens": r["prompt_tokens"], "packed_steps": graphs.packed_replays - packs if graphs is not None else 0})
        print_table([rows[-1]], list(rows[-1]))
    print(write_result("engine", {**settings, "config": args.config, "weights_gib": weights_gib, "load_s": load_s,
                                  "ceilings": ceil}, rows, args.out))


def graph_times(args, settings: dict, engine: LLMEngine, processor: Processor, weights_gib: float, ceil: dict,
                load_s: float) -> None:
    """--prefill-graph-times: each captured prefill graph replayed alone (its inputs as left:
    padding tokens, uniform routing; packed: max_seqs prompts of equal length), one prompt's and
    packed, ms by bucket: the cost of a prefill step against its tokens, from which a pack's
    token cap is read."""
    graphs = engine.runner.prefill_graphs
    rows = []
    for kind, table in (("one", graphs.graphs), ("packed", graphs.packed)):
        for b, (graph, _) in sorted(table.items()):
            n = graphs.max_seqs              # packed: that many equal prompts (their attention's cost)
            graphs.cu.copy_(torch.tensor([b * i // n for i in range(n + 1)] + [b], dtype=torch.int32))
            for _ in range(2):
                graph.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(5):
                start.record()
                graph.replay()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            ms = float(np.median(times))
            rows.append({"kind": "prefill_graph", "graph": kind, "tokens": b, "ms": ms, "us_per_token": 1e3 * ms / b})
    print_table(rows, list(rows[0]))
    print(write_result("engine", {**settings, "config": args.config, "weights_gib": weights_gib, "load_s": load_s,
                                  "ceilings": ceil}, rows, args.out))


def report(args, settings: dict, rows: list[dict], ttft: list[dict], weights_gib: float, ceil: dict,
           load_s: float) -> None:
    """Print the rows' tables and write their JSON."""
    cols = ["tp", "ep", "routing", "concurrency", "overlap_schedule", "structured", "grammar_cost", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "per_stream_tok_s",
            "total_decode_tok_s", "decode_step_ms", "experts_hit", "floor_step_ms", "floor_over_step",
            "uniform_routing_floor_ms"]
    print_table(rows, cols)
    if ttft:
        print_table(ttft, list(ttft[0]))
    print(write_result("engine", {**settings, "config": args.config, "out_tokens": args.out_tokens,
                                  "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
                                  "routing": args.routing, "weights_gib": weights_gib,
                                  "image": "1280x720", "text_tokens": 64, "ceilings": ceil, "load_s": load_s},
                       rows + ttft, args.out))


def _moes(engine: LLMEngine) -> list:
    from qwen3vl_backend.layers.moe import SparseMoE

    return [m for m in engine.runner.model.modules() if isinstance(m, SparseMoE)]


if __name__ == "__main__":
    main()
