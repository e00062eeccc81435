"""Fused MoE and paged decode attention at Qwen3-VL-30B-A3B shapes, against PyTorch and the floor.

    python -m benchmarks.kernels [--out DIR]

Floor = max(bytes / copy bandwidth, FLOPs / bf16 matmul rate), both measured here first.
MoE bytes: the distinct experts the batch routes to (w13 + w2) plus activations in and out.
"""

import argparse
import functools
import itertools
import json
import os
from unittest import mock

import torch
import triton

from qwen3vl_kernels.attention import num_splits_for, paged_decode_attention
from qwen3vl_kernels.fused_moe import PAIR_PATH_MAX_M, fused_moe, lookup_config
from qwen3vl_kernels.fused_moe import route as route_kernel
from qwen3vl_kernels.linear import config_file
from qwen3vl_backend.layers.moe import route

from .common import cuda_time_ms, fp8_experts, graph_time_ms, per_call_ms, print_table, write_result
from .roofline import measure as roofline

E, H, I, A = 128, 2048, 768, 8        # 30B-A3B experts


def moe_loop(x, w13, w2, weights, ids):
    """The per-expert loop transformers runs (bf16)."""
    out = torch.zeros_like(x)
    for e in ids.unique().tolist():
        tok, slot = torch.where(ids == e)
        gate, up = (x[tok] @ w13[e].T).chunk(2, dim=-1)
        out.index_add_(0, tok, ((torch.nn.functional.silu(gate) * up) @ w2[e].T) * weights[tok, slot, None].to(x.dtype))
    return out


def moe_grouped_mm(x, w13_t, w2_t, weights, ids):
    """torch._grouped_mm over tokens sorted by expert (w13_t (E, H, 2I), w2_t (E, I, H))."""
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    xs = x[order // A]
    gate, up = torch._grouped_mm(xs, w13_t, offs=offs).chunk(2, dim=-1)
    y = torch._grouped_mm(torch.nn.functional.silu(gate) * up, w2_t, offs=offs)
    y = y * weights.flatten()[order, None].to(y.dtype)
    out = torch.zeros(x.shape[0] * A, x.shape[1], dtype=x.dtype, device=x.device)
    out[order] = y
    return out.view(-1, A, x.shape[1]).sum(1)


def moe_weights() -> tuple[torch.Tensor, torch.Tensor]:
    """30B-A3B's experts of one layer, bf16: w13 (E, 2I, H), w2 (E, H, I)."""
    w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16) * H ** -0.5
    w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16) * I ** -0.5
    return w13, w2


def bench_moe(ceil: dict) -> list[dict]:
    w13, w2 = moe_weights()
    w13_t, w2_t = w13.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()
    rows = []
    for m in (1, 8, 16, 32, 64, 256, 2048, 8192):
        x = torch.randn(m, H, device="cuda", dtype=torch.bfloat16)
        weights, ids = route(torch.randn(m, E, device="cuda"), A, True)
        experts = int(ids.unique().numel())
        nbytes = experts * 3 * H * I * 2 + 2 * m * H * 2
        flops = 2 * m * A * 3 * H * I
        floor = max(nbytes / (ceil["copy_bandwidth_tb_s"] * 1e12), flops / (ceil["bf16_matmul_tflops"] * 1e12)) * 1e3
        ours = cuda_time_ms(lambda: fused_moe(x, w13, w2, weights, ids))
        # the sorted (grouped GEMM) path at the same M, to place the pair path's threshold
        grouped_cfg = lookup_config(E, I, H, m, x.device)
        grouped = cuda_time_ms(lambda: fused_moe(x, w13, w2, weights, ids, grouped_cfg))
        unfused = cuda_time_ms(lambda: fused_moe(x, w13, w2, weights, ids, {**grouped_cfg, "FUSE_SILU": False}))
        # what a decode step runs: router top-k kernel + experts, inside a CUDA graph
        logits = torch.randn(m, E, device="cuda", dtype=torch.bfloat16)
        graphed = graph_time_ms(lambda: fused_moe(x, w13, w2, *route_kernel(logits, A, True)))
        loop = cuda_time_ms(lambda: moe_loop(x, w13, w2, weights, ids), iters=5)
        try:
            gmm = cuda_time_ms(lambda: moe_grouped_mm(x, w13_t, w2_t, weights, ids))
        except (RuntimeError, AttributeError) as e:
            gmm = None
            print(f"torch._grouped_mm unavailable at M={m}: {e}")
        best_ref = min(t for t in (loop, gmm) if t is not None)
        rows.append({"M": m, "experts_hit": experts, "path": "pairs" if m <= PAIR_PATH_MAX_M else "sorted",
                     "fused_ms": ours, "sorted_path_ms": grouped, "sorted_unfused_silu_ms": unfused, "route_fused_graph_ms": graphed,
                     "loop_ms": loop, "grouped_mm_ms": gmm, "floor_ms": floor, "floor_over_fused": floor / ours,
                     "floor_over_graph": floor / graphed, "speedup_vs_best_ref": best_ref / ours})
    return rows


L2_DEFEAT_BYTES = 256 * 2**20        # weights cycled per timing: several times any L2


def sweep_concentrated_routing() -> list[dict]:
    """The sorted path at M=64 where the batch's 512 pairs land on 12 experts (what greedy decoding
    of dummy weights does) and where they spread (uniform routing): the tuned config against a
    grid, each config timed on both routings."""
    w13, w2 = moe_weights()
    m = 64
    x = torch.randn(m, H, device="cuda", dtype=torch.bfloat16)
    uniform = route(torch.randn(m, E, device="cuda"), A, True)
    hot = torch.randn(m, E, device="cuda")
    hot[:, :12] += 20.0                          # every token's top-8 among the first 12 experts
    concentrated = route(hot, A, True)
    tuned = lookup_config(E, I, H, m, x.device)

    def both(cfg):
        return tuple(per_call_ms(lambda i: fused_moe(x, w13, w2, *r, cfg), calls=4) for r in (concentrated, uniform))

    base = both(tuned)
    best = (sum(base), tuned, base)
    for bm, bn, bk, warps, stages in itertools.product((16, 32, 64), (64, 128), (64, 128), (4, 8), (3,)):
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": warps, "num_stages": stages}
        try:
            t = both(cfg)
        except Exception as e:
            print(f"sorted {cfg}: {type(e).__name__}")
            continue
        best = min(best, (sum(t), cfg, t), key=lambda v: v[0])
    return [{"M": m, "tuned_concentrated_ms": base[0], "tuned_uniform_ms": base[1],
             "best_concentrated_ms": best[2][0], "best_uniform_ms": best[2][1], "config": json.dumps(best[1])}]


LINEAR_SHAPES = {"qkv": (5120, 2048), "o_proj": (2048, 4096), "router": (128, 2048)}     # (N, K), 30B-A3B


def sweep_linear(ceil: dict, ms=None) -> tuple[list[dict], dict]:
    """The decoder's projections at decode sizes: cuBLAS (F.linear) against the skinny GEMM's
    best launch shape; -> rows, and the table qwen3vl_kernels.linear reads (per shape and M, the best
    config or "cublas")."""
    from qwen3vl_kernels.linear import skinny_linear

    rows, table = [], {}
    for name, (n, k) in LINEAR_SHAPES.items():
        copies = max(2, L2_DEFEAT_BYTES // (2 * n * k))
        ws = [(torch.randn(n, k, device="cuda") * k ** -0.5).bfloat16() for _ in range(copies)]
        for m in ms or SWEEP_MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            cublas = per_call_ms(lambda i: torch.nn.functional.linear(x, ws[i % copies]))
            best = (float("inf"), None)
            if m == 1:      # up to a whole row a step: every load of a program issued at once
                space = itertools.product((1, 2, 4, 8, 16), (256, 512, 1024, 2048, 4096), (4, 8), (1, 3))
            else:
                space = itertools.product((16, 32), (256, 512), (2, 4), (3,))
            for bn, bk, warps, stages in space:
                if bn * bk > 8192 or bk > triton.next_power_of_2(k):
                    continue
                cfg = {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages}
                try:
                    took = per_call_ms(lambda i: skinny_linear(x, ws[i % copies], config=cfg))
                except Exception as e:          # out of shared memory for the larger tiles
                    print(f"linear {cfg}: {type(e).__name__}")
                    continue
                best = min(best, (took, cfg), key=lambda t: t[0])
            floor = 2 * n * k / (ceil["copy_bandwidth_tb_s"] * 1e12) * 1e3
            rows.append({"proj": name, "N": n, "K": k, "M": m, "cublas_ms": cublas, "skinny_ms": best[0],
                         "floor_over_cublas": floor / cublas, "floor_over_skinny": floor / best[0],
                         "config": json.dumps(best[1])})
            table.setdefault(f"{n},{k}", {})[str(m)] = best[1] if best[0] < cublas else "cublas"
    return rows, table


def sweep_varlen_attention() -> list[dict]:
    """The ViT's attention (16 heads, head dim 72) over one image's frame: our varlen kernel's
    launch shapes against SDPA on the same segment."""
    from qwen3vl_kernels.varlen_attention import varlen_attention_bounded

    rows = []
    for n in (3520, 784):
        q, k, v = (torch.randn(n, 16, 72, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        cu = torch.tensor([0, n], dtype=torch.int32, device="cuda")
        sdpa = cuda_time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]))
        best = (float("inf"), None)
        for bm, bn, warps, stages in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3)):
            cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
            try:
                ms = cuda_time_ms(lambda: varlen_attention_bounded(q, k, v, cu, n, 72 ** -0.5, cfg), iters=10)
            except Exception as e:          # out of shared memory for the larger tiles
                print(f"varlen {cfg}: {type(e).__name__}")
                continue
            best = min(best, (ms, json.dumps(cfg)), key=lambda t: t[0])
        rows.append({"patches": n, "sdpa_ms": sdpa, "best_ms": best[0], "config": best[1]})
    return rows


def _decode_inputs(seqs: int, ctx: int, h: int = 32, hkv: int = 4, d: int = 128, bs: int = 16, fp8: bool = False):
    """30B-A3B's decode attention inputs: (q, cache, block tables, context lengths), `seqs`
    sequences of `ctx` tokens each in their own blocks; the cache float8 e4m3 with `fp8`."""
    from qwen3vl_backend.layers.attention import kv_cast

    nb = seqs * ctx // bs
    cache = torch.randn(2, nb, bs, hkv, d, device="cuda", dtype=torch.bfloat16)
    cache = kv_cast(cache, torch.float8_e4m3fn) if fp8 else cache
    q = torch.randn(seqs, h, d, device="cuda", dtype=torch.bfloat16)
    tables = torch.arange(nb, device="cuda", dtype=torch.int32).view(seqs, -1)
    return q, cache, tables, torch.full((seqs,), ctx, device="cuda", dtype=torch.int32)


def bench_decode_attention(ceil: dict) -> list[dict]:
    rows = []
    h, hkv, d = 32, 4, 128
    for seqs, ctx in ((1, 1024), (1, 8192), (8, 1024), (64, 1024), (64, 4096), (128, 2048)):
        q, cache, tables, lens = _decode_inputs(seqs, ctx, h, hkv, d)
        ours = cuda_time_ms(lambda: paged_decode_attention(q, cache, tables, lens, d ** -0.5))
        graphed = graph_time_ms(lambda: paged_decode_attention(q, cache, tables, lens, d ** -0.5))
        k = cache[0].view(seqs, ctx, hkv, d).transpose(1, 2)          # contiguous per sequence: SDPA's best case
        v = cache[1].view(seqs, ctx, hkv, d).transpose(1, 2)
        qq = q.view(seqs, h, 1, d)
        sdpa = cuda_time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(qq, k, v, enable_gqa=True))
        floor = 2 * seqs * ctx * hkv * d * 2 / (ceil["copy_bandwidth_tb_s"] * 1e12) * 1e3
        rows.append({"seqs": seqs, "ctx": ctx, "splits": num_splits_for(seqs, hkv), "paged_ms": ours,
                     "paged_graph_ms": graphed, "sdpa_ms": sdpa, "floor_ms": floor, "floor_over_paged": floor / ours,
                     "floor_over_graph": floor / graphed})
    return rows


def sweep_decode_attention(fp8: bool = False) -> tuple[list[dict], dict]:
    """Paged decode attention's launch shapes (tile tokens, warps, stages, programs aimed at) per
    batch size, 1024-token contexts (the benchmarks' ~1 k), graph replay; -> rows, {seqs: best}.
    `fp8`: over a float8 cache, -> {"fp8": {seqs: best}} (the table's overlay for one; alone these
    have misled before: engine_ab decides, as for the H200's "fp8" entry at 128)."""
    from qwen3vl_kernels.attention import DEFAULT_CONFIG, num_splits_for

    hkv, d, ctx = 4, 128, 1024
    rows, table = [], ({} if fp8 else {"1": DEFAULT_CONFIG})   # batch 1: launch-bound, 32 splits whatever the aim
    for seqs in (16, 64, 128):
        q, cache, tables, lens = _decode_inputs(seqs, ctx, hkv=hkv, d=d, fp8=fp8)
        best, base = (float("inf"), None), None
        for tokens, warps, stages, target in itertools.product((32, 64, 128), (4, 8), (2, 3), (128, 512, 1024)):
            cfg = {"PAGES_TOKENS": tokens, "num_warps": warps, "num_stages": stages, "target_programs": target}
            try:
                ms = graph_time_ms(lambda: paged_decode_attention(q, cache, tables, lens, d ** -0.5, config=cfg))
            except Exception as e:          # out of shared memory for the larger tiles
                print(f"decode attention {cfg}: {type(e).__name__}")
                continue
            if cfg == DEFAULT_CONFIG:
                base = ms
            best = min(best, (ms, cfg), key=lambda t: t[0])
        rows.append({"seqs": seqs, "ctx": ctx, "default_ms": base, "best_ms": best[0],
                     "splits": num_splits_for(seqs, hkv, best[1]["target_programs"]), "config": json.dumps(best[1])})
        table[str(seqs)] = best[1]
    return rows, ({"fp8": table} if fp8 else table)


# (KV heads, query group) a GPU sees at batch 1: 30B-A3B on one, 235B-A22B at tp 2 and tp 1
DECODE_HEAD_SHAPES = {"30B-A3B": (4, 8), "235B-A22B tp2": (2, 16), "235B-A22B": (4, 16)}


def sweep_decode_attention_one() -> tuple[list[dict], dict]:
    """Batch-1 paged decode attention per model's heads: splits (programs aimed at), tile tokens
    and warps, 1024-token context, each call on its own cache past L2 as a step's layers read
    theirs, graph replay; -> rows, {"1,KV heads,group": best}."""
    from qwen3vl_kernels.attention import DEFAULT_CONFIG, num_splits_for, paged_decode_attention

    ctx, d = 1024, 128
    rows, table = [], {}
    for name, (hkv, group) in DECODE_HEAD_SHAPES.items():
        copies = max(2, L2_DEFEAT_BYTES // (2 * ctx * hkv * d * 2))
        inputs = [_decode_inputs(1, ctx, hkv * group, hkv, d) for _ in range(copies)]
        best, base = (float("inf"), None), None
        for target, tokens, warps in itertools.product((8, 16, 32, 64, 128), (32, 64, 128), (4, 8)):
            cfg = {**DEFAULT_CONFIG, "PAGES_TOKENS": tokens, "num_warps": warps, "target_programs": target}
            try:
                took = per_call_ms(lambda i: paged_decode_attention(*inputs[i % copies], d ** -0.5, config=cfg),
                                   calls=32)
            except Exception as e:          # out of shared memory or registers
                print(f"decode attention {name} {cfg}: {type(e).__name__}")
                continue
            if cfg == DEFAULT_CONFIG:
                base = took
            best = min(best, (took, cfg), key=lambda t: t[0])
        rows.append({"model": name, "kv_heads": hkv, "group": group, "ctx": ctx, "default_ms": base,
                     "best_ms": best[0], "splits": num_splits_for(1, hkv, best[1]["target_programs"]),
                     "config": json.dumps(best[1])})
        table[f"1,{hkv},{group}"] = best[1]
    return rows, table


NORM_ROUTE_SHAPES = {"30B-A3B": (2048, 128), "235B-A22B": (4096, 128)}      # (hidden, experts)


def sweep_norm_route() -> tuple[list[dict], dict]:
    """The batch-1 norm + router launch's shapes (router rows a program, warps) per (hidden,
    experts), graph replay with the routers cycled past L2 as a decode step's layers read theirs;
    -> rows, {"D,E": best}."""
    from qwen3vl_kernels.fused_moe import NORM_ROUTE_CONFIG, norm_route

    rows, table = [], {}
    for name, (d, e) in NORM_ROUTE_SHAPES.items():
        copies = max(2, L2_DEFEAT_BYTES // (2 * d * e))
        gates = [torch.randn(e, d, device="cuda", dtype=torch.bfloat16) * d ** -0.5 for _ in range(copies)]
        x, res = (torch.randn(1, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        nw = torch.ones(d, device="cuda", dtype=torch.bfloat16)
        counter = torch.zeros(1, dtype=torch.int32, device="cuda")
        best, base = (float("inf"), None), None
        # one warp: every reduction inside the warp (sm_90, the 30B shape: 1 bar.sync against 31 at
        # two warps, 210 registers at 2 rows a program; 4 rows spill)
        for block_e, warps in itertools.product((1, 2, 4, 8, 16), (1, 2, 4, 8)):
            cfg = {"BLOCK_E": block_e, "num_warps": warps}
            try:
                took = per_call_ms(lambda i: norm_route(x, res, nw, 1e-6, gates[i % copies], 8, True, counter,
                                                        config=cfg))
            except Exception as err:          # registers for the widest tiles
                print(f"norm_route {cfg}: {type(err).__name__}")
                continue
            if cfg == NORM_ROUTE_CONFIG:
                base = took
            best = min(best, (took, cfg), key=lambda t: t[0])
        rows.append({"model": name, "D": d, "E": e, "default_ms": base, "best_ms": best[0],
                     "config": json.dumps(best[1])})
        table[f"{d},{e}"] = best[1]
    return rows, table


def bench_quantize() -> list[dict]:
    """Activation quantization (per token and 128-wide group) at a 954-token prompt's shapes (30B:
    q/k/v's and the MoE's input, o_proj's, the MoE intermediate's 7632 pairs) and decode batches:
    the program-per-token kernel against the flat (token, group)-pair one, bit for bit the same.
    Sixteen calls on one input in one graph, per call (the input is what the kernel before just
    wrote, in L2; one call a graph measured the replay's own ~18 us: 971d3ba's file)."""
    from qwen3vl_kernels.fp8 import quantize_launch

    rows = []
    for t, k, column_major in ((954, 2048, False), (954, 2048, True), (954, 4096, True), (7632, 768, False),
                               (16, 2048, False), (64, 2048, False), (512, 768, False)):
        x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
        us = {flat: per_call_ms(lambda i, f=flat: quantize_launch(x, 128, column_major, f)) * 1e3
              for flat in (False, True)}
        q0, q1 = (quantize_launch(x, 128, column_major, flat) for flat in (False, True))
        same = torch.equal(q0[0].view(torch.uint8), q1[0].view(torch.uint8)) and torch.equal(q0[1], q1[1])
        rows.append({"tokens": t, "K": k, "scales_column_major": column_major, "per_token_us": round(us[False], 2),
                     "flat_us": round(us[True], 2), "flat_tb_s": round(t * k * 3 / us[True] / 1e6, 2), "same_bits": same})
    return rows


def bench_align() -> list[dict]:
    """The MoE's expert alignment (one launch, a program per expert) at a prefill's pairs (954 and
    2048 tokens at top-8) and decode batches: its chunk cap and warps swept, uniform routing,
    sixteen different id sets per graph (per call), each launch's output checked equal to the torch
    alignment's ("default": align_by_expert's own choice)."""
    from qwen3vl_kernels.fused_moe import ALIGN_MAX_BLOCK, align_by_expert, align_by_expert_reference

    rows = []
    for tokens in (2048, 954, 512, 256, 64, 16):
        ids = [torch.rand(tokens, E, device="cuda").topk(A, dim=-1).indices.to(torch.int32) for _ in range(16)]
        want = align_by_expert_reference(ids[0], E, 64)
        for cap, warps in [(None, None)] + list(itertools.product((ALIGN_MAX_BLOCK, 2048, 4096, 8192, 16384),
                                                                   (None, 4, 8, 16))):
            if cap is not None and cap > max(ALIGN_MAX_BLOCK, triton.next_power_of_2(tokens * A)):
                continue
            try:
                got = align_by_expert(ids[0], E, 64, max_block=cap, warps=warps)
                us = per_call_ms(lambda i: align_by_expert(ids[i], E, 64, max_block=cap, warps=warps)) * 1e3
            except Exception as err:         # registers / shared memory for the widest chunks
                print(f"align {tokens} cap {cap} warps {warps}: {type(err).__name__}")
                continue
            total = int(want[2])
            same = (torch.equal(got[0][:total], want[0][:total]) and torch.equal(got[2], want[2])
                    and torch.equal(got[1][: total // 64], want[1][: total // 64]))
            rows.append({"tokens": tokens, "pairs": tokens * A, "max_block": cap or "default", "warps": warps or "default",
                         "us": round(us, 2), "same": same})
    return rows


def bench_fp8(ceil: dict) -> list[dict]:
    """Block-fp8 against bf16 at 30B-A3B shapes, each against its own floor: the decoder's
    projections (fp8 GEMV / cuBLAS fp8 against the skinny GEMM / cuBLAS bf16) and the fused MoE
    with uniform routing (fp8 weights dequantized in registers against bf16 weights). Weights
    cycle past L2 as a decode step reads them."""
    from qwen3vl_kernels.fp8 import fp8_linear, quantize_weight_blocks
    from qwen3vl_kernels.linear import skinny_linear

    bw, block = ceil["copy_bandwidth_tb_s"] * 1e12, (128, 128)
    rows = []
    for n, k in ((5120, 2048), (2048, 4096)):          # qkv, o_proj
        copies = max(2, L2_DEFEAT_BYTES // (n * k * 2))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5 for _ in range(copies)]
        qs = [quantize_weight_blocks(w.float(), block) for w in ws]
        for m in (1, 4, 16, 64, 2048):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            bf16 = per_call_ms(lambda i: skinny_linear(x, ws[i % copies]) if m <= 16
                                else torch.nn.functional.linear(x, ws[i % copies]))
            fp8 = per_call_ms(lambda i: fp8_linear(x, *qs[i % copies], block))
            floor8 = (n * k * (1 + 4 / 128 ** 2) + 2 * m * (n + k)) / bw * 1e3
            floor16 = (n * k * 2 + 2 * m * (n + k)) / bw * 1e3
            rows.append({"kernel": f"linear N={n} K={k}", "M": m, "bf16_ms": bf16, "fp8_ms": fp8,
                         "bf16_floor_ms": floor16, "fp8_floor_ms": floor8, "fp8_floor_over_time": floor8 / fp8,
                         "bf16_floor_over_time": floor16 / bf16})
    w13, w2 = moe_weights()
    q13, s13, q2, s2 = fp8_experts(w13, w2, block)
    for m in (1, 4, 16, 64, 256, 2048, 8192):
        x = torch.randn(m, H, device="cuda", dtype=torch.bfloat16)
        weights, ids = route(torch.rand(m, E, device="cuda") * 8, A, True)          # uniform top-k
        experts = int(ids.unique().numel())
        bf16 = cuda_time_ms(lambda: fused_moe(x, w13, w2, weights, ids))
        fp8 = cuda_time_ms(lambda: fused_moe(x, q13, q2, weights, ids, w13_scale=s13, w2_scale=s2, block=block))
        by_mode = {}
        for mode, threshold in (("w8a16", 1 << 30), ("w8a8", 1)):          # the sorted path both ways
            with mock.patch.dict(os.environ, {"QWEN3VL_W8A8_MIN_M": str(threshold)}):
                by_mode[mode] = cuda_time_ms(lambda: fused_moe(x, q13, q2, weights, ids, w13_scale=s13, w2_scale=s2,
                                                               block=block)) if m > 16 else None
        floor8 = (experts * 3 * H * I * (1 + 4 / 128 ** 2) + 4 * m * H) / bw * 1e3
        floor16 = (experts * 3 * H * I * 2 + 4 * m * H) / bw * 1e3
        rows.append({"kernel": "fused MoE (uniform routing)", "M": m, "experts_hit": experts, "bf16_ms": bf16,
                     "fp8_ms": fp8, "fp8_w8a16_ms": by_mode["w8a16"], "fp8_w8a8_ms": by_mode["w8a8"],
                     "bf16_floor_ms": floor16, "fp8_floor_ms": floor8,
                     "fp8_floor_over_time": floor8 / fp8, "bf16_floor_over_time": floor16 / bf16})
    return rows


FP8_GEMV_SHAPES = {"30B qkv": (5120, 2048), "30B o_proj": (2048, 4096),
                   "235B qkv": (9216, 4096), "235B o_proj": (4096, 8192),
                   "235B qkv tp2": (4608, 4096), "235B o_proj tp2": (4096, 4096)}
SWEEP_MS = (1, 4, 16)           # the GEMV sweeps' default rows (--ms); a table keeps the M it was not given


def sweep_fp8_gemv(ms=None) -> tuple[list[dict], dict]:
    """The fp8 GEMV's launch shapes at decode sizes (graph replay per call, weights past L2) against
    the bf16 skinny GEMM on the same shape; -> rows (best per shape and M) and the table
    qwen3vl_kernels.fp8 reads."""
    from qwen3vl_kernels.fp8 import fp8_gemv, quantize_weight_blocks
    from qwen3vl_kernels.linear import skinny_linear

    rows, table = [], {}
    for name, (n, k) in FP8_GEMV_SHAPES.items():
        copies = max(2, L2_DEFEAT_BYTES // (n * k))
        qs = [tuple(t.cuda() for t in quantize_weight_blocks(torch.randn(n, k) * 0.02, (128, 128))) for _ in range(copies)]
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(max(2, copies // 2))]
        for m in ms or SWEEP_MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            bf16 = per_call_ms(lambda i: skinny_linear(x, ws[i % len(ws)]))
            # GROUP_SCALE: the scales loaded once per block of a K step instead of once per column
            if m == 1:      # up to a whole row a step (BLOCK_K = K): one round trip per program;
                # the row kernel (qwen3vl_kernels.fp8._fp8_row_kernel): INT_CVT, the weights made float32 by
                # integer ops, or HALF2, multiplied in float16 pairs
                space = itertools.chain(
                    itertools.product((1, 2, 4, 8, 16), (256, 512, 1024, 2048, 4096), (4, 8), (False,),
                                      (False, True), (None,)),
                    itertools.product((4, 8, 16), (256, 512, 1024, 2048), (4, 8), (False,), (False, True),
                                      ("INT_CVT",)),
                    itertools.product((2, 4, 8, 16), (256, 512, 1024, 2048), (4, 8), (False,), (False, True),
                                      ("HALF2",)))
            else:
                space = itertools.product((16, 32), (128, 256, 512), (4, 8), (False, True), (False, True), (None,))
            best, best_row = (float("inf"), None), {}
            for bn, bk, warps, a8, group_scale, row in space:
                if (a8 and (bk != 128 or group_scale)) or bn * bk > 16384 or bk > triton.next_power_of_2(k):
                    continue            # W8A8 steps one scale block at a time; a tile's registers
                cfg = {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": 3,
                       **({"A8": True} if a8 else {}), **({"GROUP_SCALE": True} if group_scale else {}),
                       **({row: True} if row else {})}
                try:
                    took = per_call_ms(lambda i: fp8_gemv(x, *qs[i % copies], (128, 128), config=cfg))
                except Exception as e:          # out of registers or shared memory for the larger tiles
                    print(f"fp8 gemv {cfg}: {type(e).__name__}")
                    continue
                best = min(best, (took, cfg), key=lambda t: t[0])
                if row:
                    best_row[row] = min(best_row.get(row, (float("inf"), None)), (took, cfg), key=lambda t: t[0])
            floor = n * k * (1 + 4 / 128 ** 2) / (roofline_cache()["copy_bandwidth_tb_s"] * 1e12) * 1e3
            rows.append({"proj": name, "N": n, "K": k, "M": m, "bf16_skinny_ms": bf16, "fp8_ms": best[0],
                         "fp8_floor_ms": floor, "floor_over_fp8": floor / best[0],
                         **{f"{row.lower()}_ms": t for row, (t, _) in best_row.items()}, "config": json.dumps(best[1])})
            table.setdefault(f"{n},{k}", {})[str(m)] = best[1]
    return rows, table


DENSE_MS = (8, 16, 32, 64, 128)     # decode batches the dense sweep times (--ms replaces them)


def sweep_fp8_dense(ms=None) -> tuple[list[dict], dict]:
    """The fp8 projections at decode batches of 8-128 rows: the one-expert grouped GEMM's launch
    shapes (W8A16 and W8A8, split-K or not) against the path without it (the GEMV up to 16 rows, else cuBLAS's
    block-scaled GEMM with its quantize launch); graph replay per call, weights past L2. -> rows
    (best per shape and M) and the fp8_dense table: the best shape where it beats that path by 3%,
    else "default"."""
    from qwen3vl_kernels import fp8
    from qwen3vl_kernels.fused_moe import dense_fp8_gemm

    block = (128, 128)
    rows, table = [], {}
    for name, (n, k) in FP8_GEMV_SHAPES.items():
        copies = max(2, L2_DEFEAT_BYTES // (n * k))
        qs = [tuple(t.cuda() for t in fp8.quantize_weight_blocks(torch.randn(n, k) * 0.02, block)) for _ in range(copies)]
        for m in ms or DENSE_MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            with mock.patch.object(fp8, "dense_config", lambda *a: None):
                base = per_call_ms(lambda i: fp8.fp8_linear(x, *qs[i % copies], block))
            best = (float("inf"), None)
            # (the first sweep, ec3630f: 32-row blocks, 3 stages and 8 warps never won)
            # BITS: W8A16's weights made bfloat16 by integer ops (engine_ab, twentieth session: c16 0.994)
            for bm, bn, stages, a8, split, bits in itertools.product((16, 64), (32, 64, 128), (4, 6), (False, True),
                                                                     (1, 2, 4, 8), (False, True)):
                if bm > max(16, triton.next_power_of_2(m)) or (a8 and bits):
                    continue            # blocks of padding rows; BITS is W8A16's
                cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4,
                       "num_stages": stages, **({"A8": True} if a8 else {}), **({"SPLIT_K": split} if split > 1 else {}),
                       **({"BITS": True} if bits else {})}
                try:
                    took = per_call_ms(lambda i: dense_fp8_gemm(x, *qs[i % copies], block, cfg))
                except Exception as e:          # out of shared memory for the deepest tiles
                    print(f"fp8 dense {cfg}: {type(e).__name__}")
                    continue
                best = min(best, (took, cfg), key=lambda t: t[0])
            floor = (n * k * (1 + 4 / 128 ** 2) + 2 * m * (n + k)) / (roofline_cache()["copy_bandwidth_tb_s"] * 1e12) * 1e3
            wins = best[1] is not None and best[0] < 0.97 * base
            rows.append({"proj": name, "N": n, "K": k, "M": m, "without_ms": base, "dense_ms": best[0],
                         "fp8_floor_ms": floor, "floor_over_dense": floor / best[0], "floor_over_without": floor / base,
                         "config": json.dumps(best[1])})
            table.setdefault(f"{n},{k}", {})[str(m)] = best[1] if wins else "default"
    return rows, table


@functools.lru_cache(maxsize=None)
def roofline_cache() -> dict:
    return roofline()


def _fp8_gemv_file(device_name: str):
    from qwen3vl_kernels.fp8 import gemv_config_file

    return gemv_config_file(device_name, (128, 128))


def _fp8_dense_file(device_name: str):
    from qwen3vl_kernels.fp8 import dense_config_file

    return dense_config_file(device_name, (128, 128))


def _norm_route_file(device_name: str):
    from qwen3vl_kernels.fused_moe import norm_route_config_file

    return norm_route_config_file(device_name)


def _decode_attention_file(device_name: str):
    from qwen3vl_kernels.attention import config_file as attention_config_file

    return attention_config_file(device_name)


def merge_table(path, table: dict) -> dict:
    """{"N,K": {"M": config}} swept into the table at `path`: the shapes and M not swept stay."""
    merged = json.loads(path.read_text()) if path.exists() else {}
    for key, by_m in table.items():
        merged[key] = {**merged.get(key, {}), **by_m} if isinstance(by_m, dict) else by_m
    return merged


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--write-configs", action="store_true",
                    help="write the skinny GEMM's, the fp8 GEMV's and decode attention's swept tables to "
                         "qwen3vl_kernels/configs/ for this GPU")
    ap.add_argument("--only", default="moe,linear,routing,varlen,attention,fp8,fp8gemv,fp8dense,decodeattn,decodeattn1,normroute",
                    help="comma-separated parts to run")
    ap.add_argument("--ms", default=None, help="the GEMV sweeps' batch sizes (default 1,4,16)")
    args = ap.parse_args(argv)
    ms = tuple(int(m) for m in args.ms.split(",")) if args.ms else SWEEP_MS
    parts = set(args.only.split(","))
    ceil = roofline_cache()
    rows = []
    for part, sweep, title, path_of, what in (
            ("fp8gemv", lambda: sweep_fp8_gemv(ms), "fp8 GEMV launch shapes at decode sizes, best per (N, K, M), against the bf16 "
             "skinny GEMM", _fp8_gemv_file, "fp8 GEMV"),
            ("fp8dense", lambda: sweep_fp8_dense(ms if args.ms else None), "fp8 projections at decode batches: the "
             "one-expert grouped GEMM against the GEMV / cuBLAS", _fp8_dense_file, "fp8 dense"),
            ("linear", lambda: sweep_linear(ceil, ms), "decoder projections at decode sizes: cuBLAS against the skinny GEMM "
             "(graph replay per call)", config_file, "skinny GEMM"),
            ("decodeattn", sweep_decode_attention, "paged decode attention launch shapes (graph replay)",
             _decode_attention_file, "decode attention"),
            ("decodeattn8", lambda: sweep_decode_attention(fp8=True), "paged decode attention launch shapes over "
             "an fp8 cache (graph replay)", _decode_attention_file, "decode attention (fp8 cache)"),
            ("decodeattn1", sweep_decode_attention_one, "batch-1 paged decode attention per model's heads (graph "
             "replay, caches past L2)", _decode_attention_file, "decode attention"),
            ("normroute", sweep_norm_route, "batch-1 norm + router launch shapes (graph replay, routers past L2)",
             _norm_route_file, "norm + router")):
        if part not in parts:
            continue
        found, table = sweep()
        print(title)
        print_table(found, list(found[0]))
        rows += found
        path = path_of(torch.cuda.get_device_name())
        if args.write_configs:
            path.write_text(json.dumps(merge_table(path, table), indent=1) + "\n")
            print(f"{what} table written to {path}")
        else:
            print(f"{what} table for {path.name} (--write-configs writes it):\n{json.dumps(table)}")
    sections = [("routing", "sorted path at M=64: 12 experts hit against uniform routing", sweep_concentrated_routing),
                ("moe", "fused MoE, 30B-A3B shapes (E=128, H=2048, I=768, top-8), bf16", lambda: bench_moe(ceil)),
                ("varlen", "ViT varlen attention (16 heads, D=72), bf16", sweep_varlen_attention),
                ("attention", "paged decode attention (32 q / 4 kv heads, D=128, block 16), bf16",
                 lambda: bench_decode_attention(ceil)),
                ("fp8", "block fp8 against bf16 (30B-A3B shapes), each against its floor", lambda: bench_fp8(ceil)),
                ("quantize", "activation quantization: a program per token against flat (token, group) tiles",
                 bench_quantize),
                ("align", "the MoE's expert alignment: chunk cap and warps (block_m 64)", bench_align)]
    for name, title, bench in sections:
        if name in parts:
            part = bench()
            print(title)
            print_table(part, list(part[0]))
            rows += part
    print(write_result("kernels", {"ceilings": ceil, "moe_shape": [E, H, I, A], "parts": sorted(parts)}, rows, args.out))


if __name__ == "__main__":
    main()
