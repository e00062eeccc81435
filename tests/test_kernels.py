"""Triton kernels against their PyTorch references over awkward shapes.

On CPU they run in Triton's interpreter at small sizes; on a GPU in bf16 at larger ones,
including a CUDA-graph replay. Errors are ||out - ref|| / ||ref||.
"""

import pytest
import torch

from kernels.attention import paged_decode_attention, paged_decode_attention_reference
from kernels.fused_moe import align_by_expert, fused_moe, fused_moe_reference
from kernels.rmsnorm import rmsnorm, rmsnorm_reference
from kernels.rope import rope_
from kernels.varlen_attention import varlen_attention
from qwen3vl_backend.layers.rotary import apply_rotary, mrope_axis_map, mrope_cos_sin, rope_inv_freq
from qwen3vl_backend.layers.attention import varlen_attention_torch
from qwen3vl_backend.layers.moe import route

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
def test_fused_moe_matches_reference(m, e, h, i, a):
    x, w13, w2, w, ids = moe_inputs(m, e, h, i, a, device=DEV)
    out = fused_moe(x, w13, w2, w, ids, SMALL_CFG)
    assert rel(out, fused_moe_reference(x, w13, w2, w, ids)) < FP32_TOL


def test_align_by_expert_covers_every_pair_once():
    ids = torch.tensor([[3, 1], [1, 0], [3, 3]], device=DEV)
    sorted_ids, block_expert, total = align_by_expert(ids, 4, 4)
    real = sorted_ids[sorted_ids < ids.numel()]
    assert sorted(real.tolist()) == list(range(6)) and int(total) == 12
    for b in range(int(total) // 4):
        rows = sorted_ids[b * 4 : (b + 1) * 4]
        rows = rows[rows < 6]
        assert (ids.flatten()[rows.long()] == block_expert[b]).all()


def test_fused_moe_rejects_mismatched_shapes():
    x, w13, w2, w, ids = moe_inputs(3, 4, 32, 16, 2, device=DEV)
    with pytest.raises(ValueError, match="fused_moe shapes disagree"):
        fused_moe(x, w13, w2[:, :, :8], w, ids, SMALL_CFG)


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


@pytest.mark.parametrize("segments,h,d", [([5], 2, 16), ([37, 64, 3], 2, 24), ([70], 3, 72)])
def test_varlen_attention_matches_reference(segments, h, d):
    cu = [0]
    for n in segments:
        cu.append(cu[-1] + n)
    q, k, v = (torch.randn(cu[-1], h, d, device=DEV) for _ in range(3))
    out = varlen_attention(q, k, v, cu, d ** -0.5)
    assert rel(out, varlen_attention_torch(q, k, v, cu, d ** -0.5)) < FP32_TOL


@pytest.mark.parametrize("t,h,d", [(1, 4, 32), (7, 3, 64), (5, 32, 128)])
def test_rope_matches_reference(t, h, d):
    positions = torch.randint(0, 5000, (3, t), device=DEV)
    cos, sin = mrope_cos_sin(positions, rope_inv_freq(d, 5e6).to(DEV),
                             mrope_axis_map(d // 2, (d // 8, 3 * d // 16, 3 * d // 16), True).to(DEV))
    x = torch.randn(t, h, d, device=DEV)
    want = apply_rotary(x, cos, sin)
    assert rel(rope_(x.clone(), cos, sin), want) < 1e-6


# -- GPU: real sizes, bf16, CUDA graphs --------------------------------------------------------------
@gpu
@pytest.mark.parametrize("m", [1, 3, 64, 257, 2048])
def test_fused_moe_gpu_bf16_30b_shapes(m):
    x, w13, w2, w, ids = moe_inputs(m, 128, 2048, 768, 8, torch.bfloat16, "cuda")
    assert rel(fused_moe(x, w13, w2, w, ids), fused_moe_reference(x, w13, w2, w, ids)) < 1e-2


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
    cos, sin = torch.randn(8, 128, device="cuda"), torch.randn(8, 128, device="cuda")
    cos, sin = torch.cat([cos[:, :64]] * 2, -1), torch.cat([sin[:, :64]] * 2, -1)
    rotated = torch.empty_like(q)
    for _ in range(2):      # warm up: compile outside the capture
        fused_moe(x, w13, w2, w, ids), paged_decode_attention(q, cache, tables, ctx, 0.1), rmsnorm(x, norm_w, 1e-6)
        rope_(rotated.copy_(q), cos, sin)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        moe_out = fused_moe(x, w13, w2, w, ids)
        attn_out = paged_decode_attention(q, cache, tables, ctx, 0.1)
        norm_out = rmsnorm(x, norm_w, 1e-6)
        rope_(rotated.copy_(q), cos, sin)
    x.copy_(torch.randn_like(x))                     # new inputs in the captured buffers
    q.copy_(torch.randn_like(q))
    new_w, new_ids = route(torch.randn(8, 128, device="cuda"), 8, True)
    w.copy_(new_w)
    ids.copy_(new_ids)
    graph.replay()
    torch.cuda.synchronize()
    assert rel(moe_out, fused_moe_reference(x, w13, w2, w, ids)) < 1e-2
    assert rel(attn_out, paged_decode_attention_reference(q, cache, tables, ctx, 0.1)) < 1e-2
    assert rel(norm_out, rmsnorm_reference(x, norm_w, 1e-6)) < 1e-2
    assert rel(rotated, apply_rotary(q, cos, sin)) < 1e-2
