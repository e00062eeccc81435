"""Triton kernels against their PyTorch references over awkward shapes.

On CPU they run in Triton's interpreter at small sizes; on a GPU in bf16 at larger ones,
including a CUDA-graph replay. Errors are ||out - ref|| / ||ref||.
"""

import os

import pytest
import torch
import triton
import triton.language as tl

from qwen3vl_kernels.attention import paged_decode_attention, paged_decode_attention_reference
from qwen3vl_kernels.fused_moe import align_by_expert, align_by_expert_reference, fused_moe, fused_moe_pairs, fused_moe_reference
from qwen3vl_kernels.fused_moe import route as route_kernel
from qwen3vl_kernels.linear import skinny_linear, skinny_linear_reference
from qwen3vl_kernels.rmsnorm import rmsnorm, rmsnorm_reference
from qwen3vl_kernels.rope import kv_value, qkv_prep_, vision_rotary
from qwen3vl_kernels.varlen_attention import varlen_attention
from qwen3vl_backend.layers.rotary import apply_rotary, mrope_axis_map, mrope_cos_sin, rope_inv_freq, vision_rope_cos_sin
from qwen3vl_backend.layers.attention import kv_cast, varlen_attention_torch, write_kv
from qwen3vl_backend.layers.moe import route
from qwen3vl_backend.layers.norm import RMSNorm

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"          # interpreter on CPU, compiled kernels on a GPU
FP32_TOL = 5e-3 if CUDA else 1e-5         # compiled tl.dot takes float32 operands as tf32
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
SMALL_CFG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 4, "num_stages": 1}


def rel(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def moe_inputs(m, e, h, i, a, dtype=torch.float32, device="cpu"):
    x = torch.randn(m, h, device=device).to(dtype)
    w13 = (torch.randn(e, 2 * i, h, device=device) * h ** -0.5).to(dtype)
    w2 = (torch.randn(e, h, i, device=device) * i ** -0.5).to(dtype)
    weights, ids = route(torch.randn(m, e, device=device), a, True)
    return x, w13, w2, weights, ids


@pytest.mark.parametrize("m,e,h,i,a", [(1, 8, 64, 48, 2), (7, 8, 96, 40, 2), (33, 16, 64, 24, 4), (5, 4, 80, 36, 4)])
@pytest.mark.parametrize("fuse_silu", [True, False])
@pytest.mark.parametrize("persistent", [{}, {"PERSISTENT": 1}])
def test_fused_moe_matches_reference(m, e, h, i, a, fuse_silu, persistent, monkeypatch):
    """Either gate_up epilogue (the config's FUSE_SILU; unfused, SiLU*up runs in torch after it),
    the grid a program per tile or persistent (off a GPU 4 programs, so each takes several tiles)."""
    import qwen3vl_kernels.fused_moe as fm
    from launch_record import Counted

    x, w13, w2, w, ids = moe_inputs(m, e, h, i, a, device=DEV)
    silu, calls = torch.nn.functional.silu, []
    monkeypatch.setattr(torch.nn.functional, "silu", lambda t: calls.append(1) or silu(t))
    launched = []
    kernel = fm._grouped_gemm_persistent_kernel
    monkeypatch.setattr(fm, "_grouped_gemm_persistent_kernel", Counted(kernel, launched))
    out = fused_moe(x, w13, w2, w, ids, {**SMALL_CFG, "FUSE_SILU": fuse_silu, **persistent})
    # one token takes pair blocks (the per-tile kernel); otherwise both GEMMs are persistent
    assert len(launched) == (2 if persistent and m > 1 else 0)
    assert len(calls) == (0 if fuse_silu else 1)
    assert rel(out, fused_moe_reference(x, w13, w2, w, ids)) < FP32_TOL


@pytest.mark.parametrize("persistent", [{}, {"PERSISTENT": 1}])
def test_weights_early_gives_the_same_bits(persistent):
    """WEIGHTS_EARLY (down's routing weights loaded before its K steps, not after): the same bits,
    per tile or persistent; one token takes pair blocks."""
    for m in (1, 33):
        x, w13, w2, w, ids = moe_inputs(m, 16, 64, 24, 4, device=DEV)
        cfg = {**SMALL_CFG, **persistent}
        base = fused_moe(x, w13, w2, w, ids, cfg)
        early = fused_moe(x, w13, w2, w, ids, {**cfg, "DOWN": {"WEIGHTS_EARLY": True}})
        torch.testing.assert_close(early, base, rtol=0, atol=0)
        assert rel(early, fused_moe_reference(x, w13, w2, w, ids)) < FP32_TOL


@pytest.mark.parametrize("m,e,h,i,a", [(1, 8, 64, 48, 2), (3, 6, 40, 24, 3), (5, 16, 96, 40, 4)])
def test_fused_moe_pair_path_matches_reference(m, e, h, i, a):
    x, w13, w2, w, ids = moe_inputs(m, e, h, i, a, device=DEV)
    out = fused_moe_pairs(x, w13, w2, w, ids, {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4})
    assert rel(out, fused_moe_reference(x, w13, w2, w, ids)) < 1e-5


@pytest.mark.parametrize("t,e,a", [(1, 8, 2), (4, 6, 3), (3, 128, 8)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_route_kernel_matches_torch(t, e, a, renormalize):
    logits = torch.randn(t, e, device=DEV)
    want_w, want_ids = route(logits, a, renormalize)
    got_w, got_ids = route_kernel(logits, a, renormalize)
    assert torch.equal(got_ids.long(), want_ids)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("e,a", [(8, 3), (20, 8), (128, 8)])
def test_route_kernel_breaks_ties_to_the_lower_id(e, a):
    """Logits with many equal values: the top-k slots hold the largest first and, among equals,
    the lower expert id first."""
    from qwen3vl_kernels.fused_moe import norm_route

    logits = torch.randint(-3, 3, (5, e)).float()
    logits[0] = 1.0                                         # every expert tied
    order = torch.sort(-logits, dim=1, stable=True).indices[:, :a]
    _, ids = route_kernel(logits.to(DEV), a, True)
    assert torch.equal(ids.cpu().long(), order)
    # the batch-1 router (norm + route in one launch) on the same fixed logits
    d = 32
    counter = torch.zeros(1, dtype=torch.int32, device=DEV)
    for row in range(2):
        _, _, _, ids = norm_route(torch.randn(1, d).to(DEV), torch.randn(1, d).to(DEV), torch.ones(d).to(DEV), 1e-6,
                                  torch.randn(e, d).to(DEV), a, True, counter, logits[row:row + 1].to(DEV))
        assert torch.equal(ids.cpu().long(), order[row:row + 1])


def test_top_k_combine_skips_other_ranks_pairs():
    """The sorted path leaves the sentinel's rows unwritten (no zero fill): the combine must not
    read them, whatever they hold."""
    from qwen3vl_kernels.fused_moe import sum_top_k

    pairs = torch.randn(3, 4, 40, device=DEV)
    ids = torch.tensor([[0, 5, 2, 5], [5, 5, 5, 5], [1, 2, 3, 4]], dtype=torch.int32, device=DEV)
    pairs[ids == 5] = float("nan")
    want = torch.where((ids < 5)[..., None], pairs, 0.0).sum(1)
    torch.testing.assert_close(sum_top_k(pairs, ids, 5), want)
    torch.testing.assert_close(sum_top_k(pairs[2:]), pairs[2:].sum(1))


@pytest.mark.parametrize("first,local", [(0, 4), (4, 4), (8, 8)])
def test_routers_map_ids_to_this_ranks_experts(first, local):
    """Expert parallelism: the routers (torch, the route kernel, norm + route in one launch) hand
    the experts ids as this rank sees them, id - first_expert for its own and the sentinel
    (num_local, weight 0) for the others', the weights of its own unchanged."""
    from qwen3vl_kernels.fused_moe import norm_route

    e, a, d = 16, 4, 64
    g = torch.Generator().manual_seed(first + local)
    logits = torch.randn(5, e, generator=g).to(DEV)
    whole_w, whole_ids = route(logits, a, True)
    mine = (whole_ids >= first) & (whole_ids < first + local)
    assert mine.any() and not mine.all()
    want_ids = torch.where(mine, whole_ids - first, local)
    want_w = torch.where(mine, whole_w, 0.0)
    for fn in (route, route_kernel):
        w, ids = fn(logits, a, True, first_expert=first, num_local=local)
        assert torch.equal(ids.long(), want_ids.long()), fn
        torch.testing.assert_close(w, want_w, rtol=1e-5, atol=1e-6)
    # norm_route, on fixed logits (exact routing): one token
    x, res, nw = torch.randn(1, d).to(DEV), torch.randn(1, d).to(DEV), torch.ones(d).to(DEV)
    gate, counter = torch.randn(e, d).to(DEV), torch.zeros(1, dtype=torch.int32, device=DEV)
    _, _, w, ids = norm_route(x, res, nw, 1e-6, gate, a, True, counter, logits[:1].contiguous(), first, local)
    assert torch.equal(ids.long(), want_ids[:1].long())
    torch.testing.assert_close(w, want_w[:1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("d,e,a", [(64, 8, 2), (300, 20, 3), (2048, 128, 8)])
@pytest.mark.parametrize("fixed", [False, True])
@pytest.mark.parametrize("config", [None, {"BLOCK_E": 1, "num_warps": 2}, {"BLOCK_E": 16, "num_warps": 4}])
def test_norm_route_kernel_equals_norm_then_router_then_route(d, e, a, fixed, config):
    """The post-attention norm and the router in one launch (one token): h and the new residual as
    the RMSNorm kernel gives them, the routing as `route` on h's router logits (or on the fixed
    logits of the uniform-routing benchmarks), twice in a row (the arrival count resets itself),
    the second time with the router's rows read before PDL's wait."""
    from qwen3vl_kernels.fused_moe import norm_route

    dtype = torch.bfloat16 if CUDA else torch.float32
    g = torch.Generator().manual_seed(d + e)
    x, res = (torch.randn(1, d, generator=g).to(DEV, dtype) for _ in range(2))
    nw = (1 + 0.1 * torch.randn(d, generator=g)).to(DEV, dtype)
    gate = (torch.randn(e, d, generator=g) * d ** -0.5).to(DEV, dtype)
    table = torch.rand(1, e, generator=g).to(DEV) * 8 if fixed else None
    counter = torch.zeros(1, dtype=torch.int32, device=DEV)
    want_h = rmsnorm_reference(x, nw, 1e-6, res)
    logits = table if fixed else torch.nn.functional.linear(want_h, gate)
    want_w, want_ids = route(logits, a, True)
    for prefetch in (False, True):           # PREFETCH: the router's rows read before PDL's wait
        h, new_res, w, ids = norm_route(x, res, nw, 1e-6, gate, a, True, counter, table, config=config,
                                        prefetch=prefetch)
        assert int(counter) == 0 and torch.equal(new_res, x + res)
        torch.testing.assert_close(h, want_h, rtol=1e-2 if CUDA else 1e-5, atol=1e-2 if CUDA else 1e-5)
        same = (ids.long() == want_ids).float().mean().item()
        assert same == 1.0 or (CUDA and not fixed and same >= 0.75), same      # bf16 logits: rare near-ties
        if same == 1.0:
            torch.testing.assert_close(w, want_w, rtol=1e-4 if CUDA else 1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one token"):
        norm_route(torch.cat([x, x]), torch.cat([res, res]), nw, 1e-6, gate, a, True, counter, table)


@pytest.mark.parametrize("align", [align_by_expert, align_by_expert_reference])
def test_align_by_expert_covers_every_pair_once(align):
    ids = torch.tensor([[3, 1], [1, 0], [3, 3]], device=DEV)
    sorted_ids, block_expert, total = align(ids, 4, 4)
    sorted_ids = sorted_ids[: int(total)]              # past the padded count nothing is defined
    real = sorted_ids[sorted_ids < ids.numel()]
    assert sorted(real.tolist()) == list(range(6)) and int(total) == 12
    for b in range(int(total) // 4):
        rows = sorted_ids[b * 4 : (b + 1) * 4]
        rows = rows[rows < 6]
        assert (ids.flatten()[rows.long()] == block_expert[b]).all()


# (300, 128, 8): a prefill's 2,400 pairs in 1024-id chunks; (600, 128, 8): 4,800, read as one chunk
# (ALIGN_ONE_CHUNK_MIN / MAX) at 16 warps
@pytest.mark.parametrize("m,e,a,block_m", [(1, 8, 2, 16), (33, 16, 4, 16), (100, 128, 8, 16), (300, 128, 8, 64),
                                           (600, 128, 8, 64)])
def test_align_kernel_equals_torch_alignment(m, e, a, block_m):
    ids = torch.stack([torch.randperm(e, device=DEV)[:a] for _ in range(m)]).int()
    got, want = align_by_expert(ids, e, block_m), align_by_expert_reference(ids, e, block_m)
    n = int(want[2])
    assert int(got[2]) == n
    assert torch.equal(got[0][:n], want[0][:n]) and torch.equal(got[1][: n // block_m], want[1][: n // block_m].int())


def test_fused_moe_rejects_mismatched_shapes():
    x, w13, w2, w, ids = moe_inputs(3, 4, 32, 16, 2, device=DEV)
    with pytest.raises(ValueError, match="fused_moe shapes disagree"):
        fused_moe(x, w13, w2[:, :, :8], w, ids, SMALL_CFG)


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("n,k,bias", [(24, 100, False), (7, 64, True), (40, 300, False)])
def test_skinny_linear_matches_reference(m, n, k, bias):
    x, w = torch.randn(m, k, device=DEV), torch.randn(n, k, device=DEV)
    b = torch.randn(n, device=DEV) if bias else None
    cfg = {"BLOCK_N": 8, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
    assert rel(skinny_linear(x, w, b, cfg), skinny_linear_reference(x, w, b)) < FP32_TOL


@pytest.mark.parametrize("k,block_k", [(300, 64), (256, 256)])
def test_skinny_linear_with_the_input_norm_inside(k, block_k):
    """NORM: one row's residual add and RMSNorm inside the GEMV (every program takes the row's
    statistics, program 0 writes the next residual): what the RMSNorm kernel and then the GEMV
    give, over several K steps and programs, a bias too."""
    from qwen3vl_kernels.linear import norm_arguments

    g = torch.Generator().manual_seed(k)
    x, res = torch.randn(1, k, generator=g).to(DEV), torch.randn(1, k, generator=g).to(DEV)
    nw = (1 + 0.1 * torch.randn(k, generator=g)).to(DEV)
    w, b = torch.randn(40, k, generator=g).to(DEV), torch.randn(40, generator=g).to(DEV)
    cfg = {"BLOCK_N": 8, "BLOCK_K": block_k, "num_warps": 4, "num_stages": 1}
    new_res = torch.empty_like(x)
    got = skinny_linear(x, w, b, cfg, norm=(res, nw, 1e-6, new_res))
    h = rmsnorm_reference(x, nw, 1e-6, res)
    assert torch.equal(new_res, x + res)
    torch.testing.assert_close(got, skinny_linear(h, w, b, cfg), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="input RMSNorm"):
        norm_arguments(torch.cat([x, x]), (res, nw, 1e-6, new_res))


def test_skinny_linear_leaves_large_batches_to_torch():
    x, w = torch.randn(17, 32, device=DEV), torch.randn(8, 32, device=DEV)
    assert torch.equal(skinny_linear(x, w), torch.nn.functional.linear(x, w))
    with pytest.raises(ValueError, match="M <= 16"):
        skinny_linear(x, w, config={"BLOCK_N": 8, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1})


@pytest.mark.parametrize("m", [5, 33, 64])
def test_skinny_linear_split_k_entries_run_the_dense_grouped_gemm(m, monkeypatch):
    """A table entry with SPLIT_K (the MoE router's 128 x 2048 at 16-64 rows) runs the grouped
    GEMM's dense split-K launch, past MAX_M rows too: the product, the same bits when repeated,
    at a K that leaves a partial step (300 in 32-wide steps, 4 splits of 3 steps and the last 1)."""
    from qwen3vl_kernels import fused_moe, linear

    g = torch.Generator().manual_seed(m)
    x, w = torch.randn(m, 300, generator=g).to(DEV), torch.randn(40, 300, generator=g).to(DEV)
    entry = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 1, "SPLIT_K": 4}
    monkeypatch.setattr(linear, "lookup_config", lambda n, k, rows, device: entry)
    calls = []
    real = fused_moe.dense_gemm
    monkeypatch.setattr(fused_moe, "dense_gemm", lambda *a, **kw: calls.append(a[2]) or real(*a, **kw))
    got = skinny_linear(x, w)
    assert calls == [entry] and got.shape == (m, 40)
    assert rel(got, skinny_linear_reference(x, w)) < FP32_TOL
    assert torch.equal(skinny_linear(x, w), got)
    bias = torch.randn(40, device=DEV)                 # a bias: as if the table had no entry (F.linear)
    assert rel(skinny_linear(x, w, bias), skinny_linear_reference(x, w, bias)) < FP32_TOL and len(calls) == 2
    with pytest.raises(ValueError, match="no bias"):
        skinny_linear(x, w, bias, config=entry)


def cache_inputs(s, h, hkv, d, bs, nb, dtype=torch.float32, device="cpu", max_ctx=None):
    cache = torch.randn(2, nb, bs, hkv, d, device=device).to(dtype)
    q = torch.randn(s, h, d, device=device).to(dtype)
    ctx = torch.randint(1, max_ctx or nb * bs // s, (s,), dtype=torch.int32, device=device)
    tables = torch.stack([torch.randperm(nb, device=device) for _ in range(s)]).int()
    return q, cache, tables, ctx


@pytest.mark.parametrize("s,h,hkv,d,bs,nb", [(1, 4, 2, 32, 16, 8), (3, 8, 1, 64, 16, 20), (2, 6, 2, 32, 32, 10)])
def test_paged_decode_matches_reference(s, h, hkv, d, bs, nb):
    q, cache, tables, ctx = cache_inputs(s, h, hkv, d, bs, nb, device=DEV)
    out = paged_decode_attention(q, cache, tables, ctx, d ** -0.5)
    assert rel(out, paged_decode_attention_reference(q, cache, tables, ctx, d ** -0.5)) < FP32_TOL


@pytest.mark.parametrize("splits", [2, 8])
def test_paged_decode_split_context_matches_reference(splits):
    q, cache, tables, ctx = cache_inputs(3, 8, 2, 32, 16, 24, device=DEV)
    ctx[0] = 1                                   # most splits of this sequence are empty
    out = paged_decode_attention(q, cache, tables, ctx, 32 ** -0.5, num_splits=splits)
    assert rel(out, paged_decode_attention_reference(q, cache, tables, ctx, 32 ** -0.5)) < FP32_TOL


@pytest.mark.parametrize("splits,pages_tokens", [(1, 32), (2, 16), (8, 32)])
def test_paged_decode_prefetch_reads_the_same_keys(splits, pages_tokens):
    """PREFETCH (read before PDL's wait: the first tile but each sequence's newest position, that
    one after it) gives the same bits as the plain kernel: contexts of one token, a page and one
    past it, splits left empty, tiles of two pages and several tiles a split."""
    q, cache, tables, ctx = cache_inputs(5, 8, 2, 32, 16, 24, device=DEV)
    ctx[:4] = torch.tensor([1, 16, 17, 33], dtype=torch.int32)
    cfg = {"PAGES_TOKENS": pages_tokens, "num_warps": 4, "num_stages": 1, "target_programs": 128}
    plain = paged_decode_attention(q, cache, tables, ctx, 32 ** -0.5, num_splits=splits, config=cfg, prefetch=False)
    early = paged_decode_attention(q, cache, tables, ctx, 32 ** -0.5, num_splits=splits, config=cfg, prefetch=True)
    torch.testing.assert_close(early, plain, rtol=0, atol=0)
    assert rel(early, paged_decode_attention_reference(q, cache, tables, ctx, 32 ** -0.5)) < FP32_TOL


@pytest.mark.parametrize("splits,pages_tokens,prefetch", [(1, 32, False), (2, 16, True), (8, 32, False),
                                                      (8, 16, True)])
def test_paged_decode_prep_is_qkv_prep_then_attention(splits, pages_tokens, prefetch):
    """q/k prep inside the decode kernel (paged_decode_attention_prep) against qkv_prep_ then
    paged_decode_attention: the same output, the same cache afterwards (the newest k and v written
    once, by the split holding them), qkv untouched; contexts of one token, a page and one past it,
    empty splits, several tiles a split, with and without PREFETCH."""
    from qwen3vl_kernels.attention import paged_decode_attention_prep
    from qwen3vl_kernels.rope import qkv_prep_

    s, h, hkv, d, bs, nb = 5, 8, 2, 32, 16, 32
    g = torch.Generator().manual_seed(splits * 7 + pages_tokens)
    cache = torch.randn(2, nb, bs, hkv, d, generator=g).to(DEV)
    ctx = torch.tensor([1, 16, 17, 33, 70], dtype=torch.int32, device=DEV)
    # each sequence its own blocks, as the block manager gives them: none reads another's newest slot
    tables = torch.randperm(nb, generator=g)[: s * 6].view(s, 6).int().to(DEV)
    slots = torch.stack([tables[i, (c - 1) // bs].long() * bs + (c - 1) % bs for i, c in enumerate(ctx.tolist())])
    qkv = torch.randn(s, (h + 2 * hkv) * d, generator=g).to(DEV)
    qw, kw = (1 + 0.1 * torch.randn(d, generator=g)).to(DEV), (1 + 0.1 * torch.randn(d, generator=g)).to(DEV)
    angle = torch.rand(s, d // 2, generator=g).to(DEV) * 6
    cos, sin = torch.cat([angle.cos()] * 2, 1), torch.cat([angle.sin()] * 2, 1)
    cfg = {"PAGES_TOKENS": pages_tokens, "num_warps": 4, "num_stages": 1, "target_programs": 128}

    want_cache, raw = cache.clone(), qkv.clone()
    q, _, _ = qkv_prep_(raw, h, hkv, qw, kw, 1e-6, cos, sin, want_cache, slots)
    want = paged_decode_attention(q, want_cache, tables, ctx, d ** -0.5, num_splits=splits, config=cfg,
                                  prefetch=prefetch)
    before = qkv.clone()
    got = paged_decode_attention_prep(qkv, h, hkv, qw, kw, 1e-6, cos, sin, cache, slots, tables, ctx, d ** -0.5,
                                      num_splits=splits, config=cfg, prefetch=prefetch)
    assert torch.equal(qkv, before)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache, want_cache, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="paged_decode_attention_prep"):
        paged_decode_attention_prep(qkv[:, :-1], h, hkv, qw, kw, 1e-6, cos, sin, cache, slots, tables, ctx, 1.0)


@pytest.mark.parametrize("splits,prefetch", [(1, False), (4, True)])
def test_paged_decode_reads_an_fp8_cache(splits, prefetch):
    """--kv-cache-dtype fp8_e4m3: each tile of a float8 cache is widened to q's dtype as it loads
    (PREFETCH's early tile and newest row too), so the kernel answers as the reference over the
    same cache. A cache in neither q's dtype nor float8 is refused, and a float8 one with the prep
    inside (its newest K/V would stay unrounded in registers)."""
    from qwen3vl_kernels.attention import paged_decode_attention_prep

    dtype = torch.bfloat16 if CUDA else torch.float32
    q, cache, tables, ctx = cache_inputs(4, 8, 2, 32, 16, 24, dtype, DEV)
    ctx[:3] = torch.tensor([1, 16, 17], dtype=torch.int32)
    cache8 = kv_cast(cache * 3, torch.float8_e4m3fn)
    cfg = {"PAGES_TOKENS": 32, "num_warps": 4, "num_stages": 1, "target_programs": 128}
    out = paged_decode_attention(q, cache8, tables, ctx, 32 ** -0.5, num_splits=splits, config=cfg, prefetch=prefetch)
    want = paged_decode_attention_reference(q, cache8, tables, ctx, 32 ** -0.5)
    assert out.dtype == dtype and rel(out, want) < (FP32_TOL if dtype == torch.float32 else 1e-2)
    with pytest.raises(ValueError, match="cache for"):
        paged_decode_attention(q, cache.to(torch.float16 if CUDA else torch.bfloat16), tables, ctx, 1.0)
    qkv = torch.randn(4, 12 * 32, device=DEV).to(dtype)
    ones, tab = torch.ones(32, device=DEV, dtype=dtype), torch.ones(4, 32, device=DEV)
    with pytest.raises(ValueError, match="without the prep inside"):
        paged_decode_attention_prep(qkv, 8, 2, ones, ones, 1e-6, tab, tab, cache8, torch.arange(4, device=DEV), tables,
                                    ctx, 1.0)


def test_paged_decode_table_prefers_the_exact_heads():
    from qwen3vl_kernels.attention import DEFAULT_CONFIG, pick_config

    table = {1: {"target_programs": 128}, 16: {"target_programs": 512},
             "1,2,16": {"target_programs": 32, "PAGES_TOKENS": 128}}
    assert pick_config(table, 1, 2, 16) == {**DEFAULT_CONFIG, "target_programs": 32, "PAGES_TOKENS": 128}
    assert pick_config(table, 1, 4, 8)["target_programs"] == 128          # another model's heads: by batch
    assert pick_config(table, 12, 2, 16)["target_programs"] == 512
    assert pick_config({"1,2,16": {"num_warps": 8}}, 2, 2, 16) == DEFAULT_CONFIG
    assert pick_config({}, 1, 2, 16) == DEFAULT_CONFIG
    # a float8 cache: the "fp8" entry under the key chosen goes over it, and only for a float8 cache
    table["fp8"] = {"16": {"PAGES_TOKENS": 128}, "1,2,16": {"num_warps": 2}}
    assert pick_config(table, 12, 2, 16, fp8_cache=True) == {**DEFAULT_CONFIG, "target_programs": 512,
                                                              "PAGES_TOKENS": 128}
    assert pick_config(table, 12, 2, 16)["PAGES_TOKENS"] == DEFAULT_CONFIG["PAGES_TOKENS"]
    assert pick_config(table, 1, 2, 16, fp8_cache=True)["num_warps"] == 2
    assert pick_config(table, 1, 4, 8, fp8_cache=True)["PAGES_TOKENS"] == DEFAULT_CONFIG["PAGES_TOKENS"]


def test_paged_decode_rejects_bad_heads_and_small_blocks():
    q, cache, tables, ctx = cache_inputs(2, 6, 4, 32, 16, 4, device=DEV)
    with pytest.raises(ValueError, match="shapes disagree"):
        paged_decode_attention(q, cache, tables, ctx, 1.0)
    q, cache, tables, ctx = cache_inputs(2, 4, 2, 32, 8, 4, device=DEV)
    with pytest.raises(ValueError, match="block size 8: needs a power of two >= 16"):
        paged_decode_attention(q, cache, tables, ctx, 1.0)


@pytest.mark.parametrize("shape", [(1, 64), (5, 100), (3, 7, 48)])
def test_rmsnorm_matches_reference(shape):
    x, w = torch.randn(shape, device=DEV), torch.randn(shape[-1], device=DEV)
    assert rel(rmsnorm(x, w, 1e-6), rmsnorm_reference(x, w, 1e-6)) < 1e-6
    r = torch.randn(shape, device=DEV)
    r2 = r.clone()
    assert rel(rmsnorm(x, w, 1e-6, r2), rmsnorm_reference(x, w, 1e-6, r)) < 1e-6
    assert torch.equal(r2, x + r)


@pytest.mark.parametrize("segments,h,d", [([5], 2, 16), ([37, 64, 3], 2, 24), ([70], 3, 72), ([9, 20], 2, 8),
                                          ([33], 1, 128)])
def test_varlen_attention_matches_reference(segments, h, d):
    cu = [0]
    for n in segments:
        cu.append(cu[-1] + n)
    q, k, v = (torch.randn(cu[-1], h, d, device=DEV) for _ in range(3))
    out = varlen_attention(q, k, v, cu, d ** -0.5)
    assert rel(out, varlen_attention_torch(q, k, v, cu, d ** -0.5)) < FP32_TOL


def _causal_reference(q, k, v, cu, scale):
    """Each segment causal on its own, its k/v heads repeated for q's group (SDPA)."""
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    for a, b in zip(cu[:-1], cu[1:]):
        kk, vv = (t[a:b].repeat_interleave(group, 1).transpose(0, 1) for t in (k, v))
        out[a:b] = torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), kk, vv, is_causal=True, scale=scale).transpose(0, 1)
    return out


@pytest.mark.parametrize("segments,h,kvh,d", [([5], 2, 1, 16), ([37, 64, 3], 4, 2, 32), ([70, 1, 33], 8, 1, 64),
                                              ([40, 41], 2, 2, 24)])
def test_varlen_causal_attention_matches_reference(segments, h, kvh, d):
    """Packed prompts' prefill (`causal`, grouped-query heads): each segment causal on its own,
    with segments of one token, past a query block (32 in the interpreter) and ending mid-block,
    a head dim that is no power of two, and a grid bounded above the longest segment (a graph's
    bucket) whose extra blocks and the trailing empty segment write nothing; q, k and v strided
    views of one qkv row."""
    from qwen3vl_kernels.varlen_attention import varlen_attention_bounded

    cu = [0]
    for n in segments:
        cu.append(cu[-1] + n)
    qkv = torch.randn(cu[-1], (h + 2 * kvh) * d, device=DEV)     # views of one row, as qkv_prep_ returns them
    q = qkv[:, : h * d].view(-1, h, d)
    k, v = (qkv[:, (h + i * kvh) * d : (h + (i + 1) * kvh) * d].view(-1, kvh, d) for i in range(2))
    cu_t = torch.tensor(cu + [cu[-1]], dtype=torch.int32, device=DEV)      # an empty segment last
    out = varlen_attention_bounded(q, k, v, cu_t, max(segments) + 40, d ** -0.5, causal=True)
    assert rel(out, _causal_reference(q, k, v, cu, d ** -0.5)) < FP32_TOL
    with pytest.raises(ValueError, match="a divisor of its heads"):
        varlen_attention_bounded(q, k[:, :1].expand(-1, 3, -1), v[:, :1].expand(-1, 3, -1), cu_t, 8, 1.0, causal=True)


def test_table_linear_runs_the_tables_own_launch_or_f_linear(monkeypatch):
    """qwen3vl_kernels.linear.table_linear (the vocabulary projection's): the skinny kernel where the table
    names a launch for the shape and row count (one row here), F.linear where it has none, says
    "cublas", names only other row counts, or gives a SPLIT_K launch."""
    import qwen3vl_kernels.linear as kl

    launched = []
    skinny = kl.skinny_linear
    monkeypatch.setattr(kl, "skinny_linear", lambda *a, **k: launched.append(k["config"]) or skinny(*a, **k))
    w = torch.randn(300, 64, device=DEV)
    x = torch.randn(1, 64, device=DEV)
    entry = {"BLOCK_N": 4, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
    got = kl.table_linear(x, w, {"300,64": {"1": entry}})
    assert launched == [entry] and rel(got, x @ w.T) < FP32_TOL
    for table in ({}, {"300,64": {"1": "cublas"}}, {"300,64": {"4": entry}}, {"64,64": {"1": entry}},
                  {"300,64": {"1": {**entry, "SPLIT_K": 4}}}):
        torch.testing.assert_close(kl.table_linear(x, w, table), torch.nn.functional.linear(x, w))
    assert len(launched) == 1
    assert kl.table_linear(torch.randn(3, 64, device=DEV), w, {"300,64": {"1": entry}}).shape == (3, 300)
    assert len(launched) == 1                      # a one-row entry never stands in for three rows


def rope_tables(t, d, device):
    positions = torch.randint(0, 5000, (3, t), device=device)
    return mrope_cos_sin(positions, rope_inv_freq(d, 5e6).to(device),
                         mrope_axis_map(d // 2, (d // 8, 3 * d // 16, 3 * d // 16), True).to(device))


@pytest.mark.parametrize("t,d,interleaved", [(1, 128, True), (5, 64, False), (40, 128, True), (300, 32, True)])
@pytest.mark.parametrize("expanded", [False, True])
def test_mrope_cos_sin_kernel_gives_torchs_tables(t, d, interleaved, expanded):
    """qwen3vl_kernels.rope.mrope_cos_sin (one launch) against layers.rotary's six torch ops: decode's
    positions (one row expanded over the three axes, stride 0) and a prompt's (three rows), with
    positions past 2^17 (the mRoPE ids of long videos) and both axis layouts: bit for bit on a GPU
    (both take CUDA's full-range cosf / sinf), float32's rounding of numpy's in the interpreter."""
    from qwen3vl_kernels.rope import mrope_cos_sin as kernel

    g = torch.Generator().manual_seed(t + d)
    positions = torch.randint(0, 300_000, (1 if expanded else 3, t), generator=g).to(DEV)
    positions = positions.expand(3, -1) if expanded else positions
    inv_freq = rope_inv_freq(d, 5e6).to(DEV)
    axis_map = mrope_axis_map(d // 2, (d // 8, 3 * d // 16, 3 * d // 16), interleaved).to(DEV)
    want = mrope_cos_sin(positions, inv_freq, axis_map)
    got = kernel(positions, inv_freq, axis_map)
    for g_, w in zip(got, want):
        assert g_.shape == w.shape and g_.dtype == torch.float32
        if CUDA:
            assert torch.equal(g_, w)
        else:
            torch.testing.assert_close(g_, w, rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="mrope_cos_sin"):
        kernel(positions[:2], inv_freq, axis_map)


def qkv_prep_reference(qkv, hq, hkv, q_norm, k_norm, cos, sin, cache, slots):
    t, d = qkv.shape[0], cache.shape[-1]
    q = apply_rotary(q_norm(qkv[:, : hq * d].reshape(t, hq, d)), cos, sin)
    k = apply_rotary(k_norm(qkv[:, hq * d : (hq + hkv) * d].reshape(t, hkv, d)), cos, sin)
    v = qkv[:, (hq + hkv) * d :].reshape(t, hkv, d)
    write_kv(cache, k, v, slots)
    return q, k, v


@pytest.mark.parametrize("t,hq,hkv,d", [(1, 4, 2, 32), (5, 6, 2, 64), (3, 8, 1, 128), (37, 4, 2, 32), (70, 2, 1, 64)])
def test_qkv_prep_matches_norm_rotary_and_cache_write(t, hq, hkv, d):
    cos, sin = rope_tables(t, d, DEV)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device=DEV)
    q_norm, k_norm = RMSNorm(d).to(DEV), RMSNorm(d).to(DEV)
    q_norm.weight.data.normal_()
    k_norm.weight.data.normal_()
    slots = torch.randperm(96, device=DEV)[:t]
    cache, want_cache = torch.zeros(2, 6, 16, hkv, d, device=DEV), torch.zeros(2, 6, 16, hkv, d, device=DEV)
    want = qkv_prep_reference(qkv, hq, hkv, q_norm, k_norm, cos, sin, want_cache, slots)
    got = qkv_prep_(qkv.clone(), hq, hkv, q_norm.weight, k_norm.weight, 1e-6, cos, sin, cache, slots)
    for g, w in zip(got, want):
        assert rel(g, w) < 1e-6
    assert rel(cache, want_cache) < 1e-6


@triton.jit
def _kv_value_kernel(x_ptr, c_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(c_ptr + i, kv_value(tl.load(x_ptr + i, mask=i < n), c_ptr), mask=i < n)


def kv_value_cast(x: torch.Tensor) -> torch.Tensor:
    """x through qwen3vl_kernels.rope.kv_value's cast: on a GPU the hardware's (torch's rounding), here the
    interpreter's, which rounds ties away from zero and can drop a rounding's carry into the
    exponent (1.97 -> 1.0 where torch gives 2.0)."""
    flat = x.contiguous().view(-1)
    out = torch.empty(flat.shape, dtype=torch.float8_e4m3fn, device=x.device)
    _kv_value_kernel[(1,)](flat, out, flat.numel(), BLOCK=triton.next_power_of_2(flat.numel()))
    return out.view(x.shape)


def test_qkv_prep_writes_an_fp8_cache_saturated():
    """An fp8 cache gets qkv_prep_'s k and v rounded to e4m3 and saturated at +-448 (v's +-1000
    here), never wrapped (the interpreter's cast, unclamped, makes 1000 into 256) nor NaN: v's
    bytes are kv_value's cast of v, k within one e4m3 step of that cast of the reference's k (the
    two computations may differ in a last bit). On a GPU the cast is torch's too (write_kv's)."""
    t, hq, hkv, d = 5, 4, 2, 32
    dtype = torch.bfloat16 if CUDA else torch.float32
    cos, sin = rope_tables(t, d, DEV)
    qkv = (torch.randn(t, (hq + 2 * hkv) * d, device=DEV) * 3).to(dtype)
    qkv[:, (hq + hkv) * d::7] = 1000.0
    qkv[:, (hq + hkv) * d + 3::7] = -1000.0
    q_norm, k_norm = RMSNorm(d).to(DEV).to(dtype), RMSNorm(d).to(DEV).to(dtype)
    slots = torch.randperm(96, device=DEV)[:t]
    cache = torch.zeros(2, 6, 16, hkv, d, device=DEV, dtype=torch.float8_e4m3fn)
    _, k, v = qkv_prep_reference(qkv.clone(), hq, hkv, q_norm, k_norm, cos, sin, cache.clone(), slots)
    qkv_prep_(qkv.clone(), hq, hkv, q_norm.weight, k_norm.weight, 1e-6, cos, sin, cache, slots)
    got = cache.view(2, -1, hkv, d)[:, slots]
    assert torch.equal(got[1].view(torch.uint8), kv_value_cast(v).view(torch.uint8))
    want_k = kv_value_cast(k).float()
    assert ((got[0].float() - want_k).abs() <= want_k.abs() / 8).all()
    assert torch.isfinite(cache.float()).all() and got[1].float().max() == 448.0 and got[1].float().min() == -448.0
    if CUDA:
        assert torch.equal(got[1].view(torch.uint8), kv_cast(v, torch.float8_e4m3fn).view(torch.uint8))


@pytest.mark.parametrize("n,heads,d,dtype", [(1, 2, 16, torch.float32), (37, 3, 72, torch.float32),
                                             (70, 2, 72, torch.bfloat16)])
def test_vision_rotary_matches_the_torch_vit_path(n, heads, d, dtype):
    """The ViT's q/k rotary and heads-major split (head dim 72 in the releases: not a power of two)
    against the torch path it replaces on GPUs: the same float32 rotary, the same v."""
    hw = torch.randint(0, 60, (n, 2), device=DEV)
    cos, sin = vision_rope_cos_sin(hw, d, 10000.0)
    qkv = torch.randn(n, 3 * heads * d, device=DEV).to(dtype)
    q, k, v = qkv.view(n, 3, heads, d).unbind(1)
    want = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v
    got = vision_rotary(qkv, cos, sin, heads)
    for g, w in zip(got, want):
        assert g.shape == (n, heads, d) and g.dtype == dtype
        assert rel(g, w) < (1e-6 if dtype == torch.float32 else 1e-2)
    assert got[0].transpose(0, 1).is_contiguous()          # heads-major: attention's layout


@pytest.mark.parametrize("n,d,dtype,delta", [(7, 1152, torch.float32, True), (5, 40, torch.float32, False),
                                             (9, 1152, torch.bfloat16, True), (1, 24, torch.bfloat16, False)])
def test_add_layer_norm_matches_torch(n, d, dtype, delta):
    """The ViT's residual add + LayerNorm launch (d 1152 in the releases, and widths that are not
    powers of two): the stream bit for bit PyTorch's add, the normalised rows its LayerNorm's."""
    from qwen3vl_kernels.layernorm import add_layer_norm, add_layer_norm_reference

    x = (torch.randn(n, d, device=DEV) * 3 + 1).to(dtype)
    dx = torch.randn(n, d, device=DEV).to(dtype) if delta else None
    w, b = torch.randn(d, device=DEV).to(dtype), torch.randn(d, device=DEV).to(dtype)
    h, s = add_layer_norm(x, dx, w, b, 1e-6)
    want_h, want_s = add_layer_norm_reference(x, dx, w, b, 1e-6)
    assert (s is x) == (not delta)
    if DEV == "cuda" or dtype == torch.float32:
        assert torch.equal(s, want_s)
    else:       # the interpreter rounds float32 to bfloat16 toward zero (a GPU to nearest): within a unit
        assert ((s.float() - want_s.float()).abs() <= want_s.float().abs() * 2 ** -7).all()
    assert h.dtype == dtype and rel(h, want_h) < (1e-6 if dtype == torch.float32 else 1e-2)
    with pytest.raises(ValueError, match="add_layer_norm"):
        add_layer_norm(x, dx, w[:-1], b[:-1], 1e-6)


# -- GPU: real sizes, bf16, CUDA graphs --------------------------------------------------------------
@gpu
@pytest.mark.parametrize("m", [1, 3, 64, 257, 2048])
def test_fused_moe_gpu_bf16_30b_shapes(m):
    x, w13, w2, w, ids = moe_inputs(m, 128, 2048, 768, 8, torch.bfloat16, "cuda")
    assert rel(fused_moe(x, w13, w2, w, ids), fused_moe_reference(x, w13, w2, w, ids)) < 1e-2


@gpu
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("n,k", [(5120, 2048), (2048, 4096), (128, 2048), (1000, 2000)])
def test_skinny_linear_gpu_bf16_30b_shapes(m, n, k):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(n, k, device="cuda") * k ** -0.5).bfloat16()
    for cfg in (None, {"BLOCK_N": 8, "BLOCK_K": 512, "num_warps": 4, "num_stages": 3}):
        assert rel(skinny_linear(x, w, config=cfg), skinny_linear_reference(x, w)) < 1e-2


@gpu
def test_paged_decode_gpu_bf16():
    q, cache, tables, ctx = cache_inputs(37, 32, 4, 128, 16, 400, torch.bfloat16, "cuda", max_ctx=1000)
    out = paged_decode_attention(q, cache, tables, ctx, 128 ** -0.5)
    assert rel(out, paged_decode_attention_reference(q, cache, tables, ctx, 128 ** -0.5)) < 1e-2


@gpu
def test_kernels_replay_in_a_cuda_graph():
    x, w13, w2, w, ids = moe_inputs(8, 128, 2048, 768, 8, torch.bfloat16, "cuda")
    q, cache, tables, ctx = cache_inputs(8, 32, 4, 128, 16, 64, torch.bfloat16, "cuda")
    norm_w = torch.randn(2048, device="cuda", dtype=torch.bfloat16)
    cos, sin = rope_tables(8, 128, "cuda")
    logits = torch.randn(8, 128, device="cuda")
    qkv = torch.randn(8, 40 * 128, device="cuda", dtype=torch.bfloat16)
    qkv_in, prep_cache = torch.empty_like(qkv), torch.zeros(2, 4, 16, 4, 128, device="cuda", dtype=torch.bfloat16)
    q_norm, k_norm = RMSNorm(128).cuda().bfloat16(), RMSNorm(128).cuda().bfloat16()
    slots = torch.arange(8, device="cuda") * 3
    xs, _, _, ws, idss = moe_inputs(33, 128, 2048, 768, 8, torch.bfloat16, "cuda")     # the sorted path
    lin = (torch.randn(640, 2048, device="cuda") * 2048 ** -0.5).bfloat16()
    skinny = {"BLOCK_N": 8, "BLOCK_K": 512, "num_warps": 4, "num_stages": 3}

    def step():
        routed = route_kernel(logits, 8, True)
        prepped = qkv_prep_(qkv_in.copy_(qkv), 32, 4, q_norm.weight, k_norm.weight, 1e-6, cos, sin, prep_cache,
                            slots)
        return (fused_moe(x, w13, w2, w, ids), fused_moe(x[:1], w13, w2, w[:1], ids[:1]),
                paged_decode_attention(q, cache, tables, ctx, 0.1), paged_decode_attention(q[:1], cache, tables[:1],
                                                                                         ctx[:1], 0.1),
                rmsnorm(x, norm_w, 1e-6), routed, prepped[0], fused_moe(xs, w13, w2, ws, idss),
                skinny_linear(x[:1], lin, config=skinny), skinny_linear(x, lin, config=skinny))

    for _ in range(2):      # warm up: compile outside the capture
        step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    x.copy_(torch.randn_like(x))                     # new inputs in the captured buffers
    q.copy_(torch.randn_like(q))
    qkv.copy_(torch.randn_like(qkv))
    logits.copy_(torch.randn_like(logits))
    new_w, new_ids = route(torch.randn(8, 128, device="cuda"), 8, True)
    w.copy_(new_w)
    ids.copy_(new_ids)
    ctx.copy_(torch.randint(1, 128, ctx.shape, device="cuda", dtype=torch.int32))
    xs.copy_(torch.randn_like(xs))
    new_w, new_ids = route(torch.randn(33, 128, device="cuda"), 8, True)
    ws.copy_(new_w)
    idss.copy_(new_ids)
    graph.replay()
    torch.cuda.synchronize()
    moe_out, moe_one, attn_out, attn_one, norm_out, (rw, rids), prep_q, sorted_out, lin_one, lin_eight = outs
    assert rel(sorted_out, fused_moe_reference(xs, w13, w2, ws, idss)) < 1e-2
    assert rel(lin_one, skinny_linear_reference(x[:1], lin)) < 1e-2
    assert rel(lin_eight, skinny_linear_reference(x, lin)) < 1e-2
    assert rel(moe_out, fused_moe_reference(x, w13, w2, w, ids)) < 1e-2
    assert rel(moe_one, fused_moe_reference(x[:1], w13, w2, w[:1], ids[:1])) < 1e-2
    assert rel(attn_out, paged_decode_attention_reference(q, cache, tables, ctx, 0.1)) < 1e-2
    assert rel(attn_one, paged_decode_attention_reference(q[:1], cache, tables[:1], ctx[:1], 0.1)) < 1e-2
    assert rel(norm_out, rmsnorm_reference(x, norm_w, 1e-6)) < 1e-2
    want_w, want_ids = route(logits, 8, True)
    assert torch.equal(rids.long(), want_ids) and rel(rw, want_w) < 1e-5
    want_q = qkv_prep_reference(qkv, 32, 4, q_norm, k_norm, cos, sin, torch.zeros_like(prep_cache), slots)[0]
    assert rel(prep_q, want_q) < 1e-2


@gpu
@pytest.mark.parametrize("segments", [[954], [954, 954], [300, 1500, 7]])
def test_varlen_causal_attention_gpu_bf16_text_shape(segments):
    """Packed prompts' prefill at 30B-A3B's attention (32 query heads, 4 KV heads of 128),
    bf16 on the GPU's launch shape, against SDPA segment by segment."""
    from qwen3vl_kernels.varlen_attention import varlen_attention_bounded

    cu = [0]
    for n in segments:
        cu.append(cu[-1] + n)
    q = torch.randn(cu[-1], 32, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(cu[-1], 4, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cu_t = torch.tensor(cu + [cu[-1]], dtype=torch.int32, device="cuda")
    out = varlen_attention_bounded(q, k, v, cu_t, 2048, 128 ** -0.5, causal=True)
    assert rel(out, _causal_reference(q, k, v, cu, 128 ** -0.5)) < 1e-2


@gpu
@pytest.mark.parametrize("n", [784, 3520])
def test_varlen_attention_gpu_bf16_vit_shape(n):
    """The real ViT's attention: 16 heads of 72 (a split head dim), one frame, against SDPA."""
    q, k, v = (torch.randn(n, 16, 72, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = varlen_attention(q, k, v, [0, n], 72 ** -0.5)
    assert rel(out, varlen_attention_torch(q, k, v, [0, n], 72 ** -0.5)) < 1e-2


@pytest.mark.parametrize("b,v,rows", [(1, 100, [0]), (5, 1000, [4, 1, 3]), (3, 151936, [2])])
def test_bitmask_kernel_masks_exactly_the_clear_bits(b, v, rows):
    """Grammar masks: the kernel against the torch expansion, at vocabularies that end mid-word and
    mid-block, on a subset of the rows, in rows' order; unmasked rows and allowed tokens untouched."""
    from qwen3vl_kernels.bitmask import apply_token_bitmask_, apply_token_bitmask_reference_

    g = torch.Generator().manual_seed(v)
    logits = torch.randn(b, v, generator=g)
    words = torch.randint(-2**31, 2**31 - 1, (len(rows), (v + 31) // 32), generator=g, dtype=torch.int64).to(torch.int32)
    logits, words, index = logits.to(DEV), words.to(DEV), torch.tensor(rows, device=DEV)
    got = apply_token_bitmask_(logits.clone(), words, index)
    want = apply_token_bitmask_reference_(logits.clone(), words, index)
    assert torch.equal(got, want)
    bit = (words[0, 7 // 32] >> (7 % 32)) & 1
    assert (got[rows[0], 7] == float("-inf")) == (bit == 0) and torch.isfinite(got[[i for i in range(b) if i not in rows]]).all()
    assert torch.equal(got[got != float("-inf")], logits[got != float("-inf")])


def test_jit_functions_return_values_only_at_their_end():
    """Triton's compiler goes on past a `return` inside a constexpr branch (the interpreter does
    not): a helper that returns a value early compiles its later statements too, for shapes they
    were never meant for (block_scaled's ROWS path failed to compile on the H200 for ROWS 0). A
    @triton.jit function that returns a value does so once, as its last statement; kernels'
    bare `return` (a program with no work) is fine."""
    import ast
    from pathlib import Path

    found = [(f"{path.name}:{node.name}", node)
             for path in sorted((Path(__file__).resolve().parent.parent / "qwen3vl_kernels").glob("*.py"))
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list)]
    assert len(found) > 10 and any(name.endswith(":block_scaled") for name, _ in found)
    bad = []
    for name, fn in found:
        valued = [r for r in ast.walk(fn) if isinstance(r, ast.Return) and r.value is not None]
        if valued and (len(valued) > 1 or fn.body[-1] is not valued[0]):
            bad.append((name, [r.lineno for r in valued]))
    assert not bad, f"jit functions returning a value before their end: {bad}"


def test_every_launch_table_falls_back_to_the_home_devices():
    """One lookup for every kernel's tuned table (qwen3vl_kernels/tables.py): a GPU with no table of its
    own reads the H200's (where they were tuned), one with its own reads that, and off a GPU the
    fused MoE reads none (the interpreter keeps the defaults)."""
    from qwen3vl_kernels import attention, fp8, fused_moe, linear

    other, home = "NVIDIA Imaginary GPU", "NVIDIA H200"
    readers = {
        "paged decode": attention._table,
        "skinny GEMM": linear._table,
        "fp8 GEMV": lambda d: fp8._gemv_table(d, (128, 128)),
        "fp8 pairs": lambda d: fused_moe._fp8_pair_table(d, (128, 128)),
        "norm_route": fused_moe._norm_route_table,
        "fused MoE": lambda d: fused_moe._find_moe_table(128, 768, 2048, d, True, None),
        "fused MoE fp8": lambda d: fused_moe._find_moe_table(64, 1536, 4096, d, True, (128, 128)),
    }
    for name, read in readers.items():
        own = read(home)
        assert own, name                    # the repository holds an H200 table of each
        assert read(other) == own, name
    assert linear._table("NVIDIA H100 80GB HBM3") not in ({}, linear._table(home))
    assert fused_moe._find_moe_table(128, 768, 2048, "cpu", False, None) is None


def test_one_row_and_several_never_share_a_launch_table_entry():
    """The GEMV tables' lookup: the nearest tuned M, but a one-row entry (a row at a time) never
    stands in for 2-16 rows (padded to 16 for tl.dot), nor the other way round: the default
    instead. (A one-row entry with 2048-wide K steps made 235B's o_proj at 16 rows a 16 x 2048
    dot tile, three times slower a step.)"""
    from qwen3vl_kernels.linear import nearest_m

    table = {"8,16": {"1": "one", "4": "four", "16": "sixteen"}, "8,32": {"1": "one"}, "8,64": {"16": "sixteen"}}
    assert [nearest_m(table, 8, 16, m, "d") for m in (1, 2, 5, 12, 16)] == ["one", "four", "four", "sixteen", "sixteen"]
    assert [nearest_m(table, 8, 32, m, "d") for m in (1, 2, 16)] == ["one", "d", "d"]
    assert [nearest_m(table, 8, 64, m, "d") for m in (1, 3)] == ["d", "sixteen"]
    assert nearest_m(table, 9, 9, 1, "d") == "d"


def test_the_skinny_tables_split_k_entries_are_dense_launches():
    """A skinny_linear table entry with SPLIT_K is a qwen3vl_kernels.fused_moe.dense_gemm launch: it names
    every key that launch reads, and its rows reach past MAX_M only up to SPLIT_MAX_M."""
    import json

    from qwen3vl_kernels.linear import SPLIT_MAX_M
    from qwen3vl_kernels.tables import CONFIG_DIR

    keys = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages", "SPLIT_K"}
    found = 0
    for path in CONFIG_DIR.glob("skinny_linear,*.json"):
        for shape, by_m in json.loads(path.read_text()).items():
            for m, entry in by_m.items():
                if isinstance(entry, dict) and "SPLIT_K" in entry:
                    found += 1
                    assert keys <= set(entry) and int(m) <= SPLIT_MAX_M, (path.name, shape, m)
    assert found           # the H200's router entry (30B-A3B's 128 x 2048 at 16 rows)


def test_kernel_warps_switch_sets_the_small_launches_warps(monkeypatch):
    """switches.KERNEL_WARPS (QWEN3VL_KERNEL_WARPS) reaches each named launch's num_warps and only
    those; unset, the launches keep their defaults; a bad spec is refused with what it may be."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("recording launches needs the interpreter (the CPU tests' mode)")
    import launch_record

    from qwen3vl_kernels import switches
    from qwen3vl_kernels.fp8 import quantize_launch
    from qwen3vl_kernels.fused_moe import align_by_expert, route, sum_top_k
    from qwen3vl_kernels.rmsnorm import rmsnorm
    from qwen3vl_kernels.rope import qkv_prep_

    assert switches.parse_kernel_warps(" rmsnorm=2, sum_top_k=1,") == {"rmsnorm": 2, "sum_top_k": 1}
    assert switches.parse_kernel_warps("") == {}
    for bad in ("rmsnorm", "rmsnorm=3", "gemm=4", "rmsnorm=64", "rmsnorm=x", "=4"):
        with pytest.raises(ValueError, match="QWEN3VL_KERNEL_WARPS"):
            switches.parse_kernel_warps(bad)

    def launched(t: int = 3) -> dict[str, int]:
        d, hq, hkv = 64, 4, 2
        with launch_record.only_recording() as rec:
            rmsnorm(torch.empty(t, 2048), torch.empty(2048), 1e-6)
            quantize_launch(torch.empty(t, 256), 128, False, False)
            quantize_launch(torch.empty(t, 256), 128, False, True)
            sum_top_k(torch.empty(t, 2, 64))
            route(torch.empty(t, 16), 2, True)
            align_by_expert(torch.zeros(t, 16, dtype=torch.int32), 16, 16)
            qkv_prep_(torch.empty(t, (hq + 2 * hkv) * d), hq, hkv, torch.empty(d), torch.empty(d), 1e-6,
                      torch.empty(t, d), torch.empty(t, d), torch.empty(2, 4, 16, hkv, d), torch.zeros(t, dtype=torch.long))
        return {r["name"]: r["num_warps"] for r in rec.records.values()}

    names = {"_rmsnorm_kernel": "rmsnorm", "_quantize_groups_kernel": "quantize", "_quantize_flat_kernel": "quantize",
             "_sum_top_k_kernel": "sum_top_k", "_route_kernel": "route", "_align_kernel": "align",
             "_qkv_prep_kernel": "qkv_prep"}
    # the defaults: one warp for route, and for align and q/k prep at small decode batches (3
    # tokens: 48 pairs, one row a prep program); 40 tokens (640 pairs, 16 rows a program) take four
    monkeypatch.setattr(switches, "KERNEL_WARPS", {})
    small = {"rmsnorm": 8, "route": 1, "align": 1, "qkv_prep": 1}
    assert launched() == {k: small.get(v, 4) for k, v in names.items()}
    assert launched(40) == {k: {"rmsnorm": 8, "route": 1}.get(v, 4) for k, v in names.items()}
    chosen = {"rmsnorm": 2, "quantize": 1, "sum_top_k": 8, "route": 2, "align": 2, "qkv_prep": 16}
    monkeypatch.setattr(switches, "KERNEL_WARPS", chosen)
    assert launched() == launched(40) == {k: chosen[v] for k, v in names.items()}
    monkeypatch.setattr(switches, "KERNEL_WARPS", {"route": 4})
    assert launched() == {k: 4 if v == "route" else small.get(v, 4) for k, v in names.items()}
