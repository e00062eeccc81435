"""The step between the fused qkv projection and attention, in one launch: per-head RMSNorm of q
and k, rotary (rotate-half layout, float32 math), and the K/V write into the paged cache.

cos/sin (T, D) are the per-token tables (mRoPE already folded in); their two halves are equal,
so only the first half is read. One program per (token, head) of the q, k and v heads.
An fp8 cache gets K/V saturated at +-448 (`kv_value`; layers/attention.py's write_kv).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import switches
from .pdl import gdc_enter, pdl


@triton.jit
def kv_value(x, cache_ptr):
    """x as the cache at cache_ptr stores it: float8 e4m3 saturated at +-448 (by a clamp, so the
    interpreter, which does not saturate, agrees), else x."""
    if cache_ptr.dtype.element_ty == tl.float8e4nv:
        out = tl.clamp(x.to(tl.float32), -448.0, 448.0).to(tl.float8e4nv)
    else:
        out = x.to(cache_ptr.dtype.element_ty)
    return out


@triton.jit
def _qkv_prep_kernel(qkv_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, cache_ptr, slot_ptr,
                     t, n_q, n_kv, eps, stride_t, stride_ct, stride_ckv, stride_slot,
                     HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_T: tl.constexpr, USE_PDL: tl.constexpr = False):
    gdc_enter(USE_PDL)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1)
    ok = (rows < t)[:, None]
    rows64 = rows.to(tl.int64)
    dims = tl.arange(0, HALF)[None, :]
    row = qkv_ptr + rows64[:, None] * stride_t + h * HEAD_DIM + dims
    x1 = tl.load(row, mask=ok)
    x2 = tl.load(row + HALF, mask=ok)
    slot = tl.load(slot_ptr + rows64, mask=rows < t, other=0)[:, None]
    dst = cache_ptr + slot * stride_slot + (h - n_q - n_kv) * HEAD_DIM + dims     # a v head's place
    if h >= n_q + n_kv:                       # v: only copied into the cache
        tl.store(dst + stride_ckv, kv_value(x1, cache_ptr), mask=ok)
        tl.store(dst + stride_ckv + HALF, kv_value(x2, cache_ptr), mask=ok)
    else:                                     # q or k: RMSNorm (float32 stats, weight after the cast), rotary
        w_ptr = qw_ptr if h < n_q else kw_ptr
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        rstd = 1.0 / tl.sqrt((tl.sum(f1 * f1, 1) + tl.sum(f2 * f2, 1)) / HEAD_DIM + eps)[:, None]
        y1 = ((f1 * rstd).to(x1.dtype) * tl.load(w_ptr + dims)).to(x1.dtype).to(tl.float32)
        y2 = ((f2 * rstd).to(x1.dtype) * tl.load(w_ptr + HALF + dims)).to(x1.dtype).to(tl.float32)
        c = tl.load(cos_ptr + rows64[:, None] * stride_ct + dims, mask=ok)
        s = tl.load(sin_ptr + rows64[:, None] * stride_ct + dims, mask=ok)
        o1 = (y1 * c - y2 * s).to(x1.dtype)
        o2 = (y2 * c + y1 * s).to(x1.dtype)
        tl.store(row, o1, mask=ok)
        tl.store(row + HALF, o2, mask=ok)
        if h >= n_q:
            dst = dst + n_kv * HEAD_DIM       # back from the v offset to this k head's place
            tl.store(dst, kv_value(o1, cache_ptr), mask=ok)
            tl.store(dst + HALF, kv_value(o2, cache_ptr), mask=ok)


# tokens per program: one in decode (its latency is the launch), a tile of them in prefill, where
# one program per (token, head) was 73,728 programs of 128 values at 2048 tokens (~90 us a layer)
QKV_PREP_ROWS = 16


def qkv_prep_(qkv: torch.Tensor, n_q: int, n_kv: int, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
              cos: torch.Tensor, sin: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor):
    """One launch between the fused qkv projection and attention, in place on qkv (T, (Hq + 2 Hkv) * D):
    q and k get their per-head RMSNorm and rotary, and k and v are written to the paged cache
    (2, NB, BS, Hkv, D) at slot_mapping. Returns views q (T, Hq, D), k, v (T, Hkv, D)."""
    d = cache.shape[-1]
    t = qkv.shape[0]
    if (qkv.shape[1] != (n_q + 2 * n_kv) * d or qkv.stride(1) != 1 or cache.shape[-2] != n_kv
            or not cache.is_contiguous() or cos.shape != (t, d) or d & (d - 1) or slot_mapping.shape != (t,)):
        raise ValueError(f"qkv_prep_: qkv {tuple(qkv.shape)}, heads {n_q}/{n_kv}, cache {tuple(cache.shape)}, "
                         f"cos {tuple(cos.shape)}, slots {tuple(slot_mapping.shape)}")
    if t:
        rows = 1 if t <= 2 * QKV_PREP_ROWS else QKV_PREP_ROWS
        _qkv_prep_kernel[(triton.cdiv(t, rows), n_q + 2 * n_kv)](
            qkv, q_weight, k_weight, cos, sin, cache, slot_mapping, t, n_q, n_kv, eps,
            qkv.stride(0), cos.stride(0), cache.stride(0), n_kv * d, HEAD_DIM=d, HALF=d // 2, BLOCK_T=rows,
            num_warps=switches.warps("qkv_prep", 1 if rows == 1 else 4), **pdl(qkv))
    q = qkv[:, : n_q * d].view(t, n_q, d)
    k = qkv[:, n_q * d : (n_q + n_kv) * d].view(t, n_kv, d)
    v = qkv[:, (n_q + n_kv) * d :].view(t, n_kv, d)
    return q, k, v


@triton.jit
def _vision_rotary_kernel(qkv_ptr, cos_ptr, sin_ptr, out_ptr, n, heads, stride_t, stride_ct,
                          HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HALF_P2: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    hh = tl.program_id(1)                     # q heads, then k heads, then v heads
    dims = tl.arange(0, HALF_P2)
    mask = (rows < n)[:, None] & (dims < HALF)[None, :]
    rows64 = rows.to(tl.int64)
    src = qkv_ptr + rows64[:, None] * stride_t + hh * HEAD_DIM + dims[None, :]
    x1 = tl.load(src, mask=mask)
    x2 = tl.load(src + HALF, mask=mask)
    dst = out_ptr + (hh.to(tl.int64) * n + rows64[:, None]) * HEAD_DIM + dims[None, :]
    if hh < 2 * heads:                        # q or k: rotate-half rotary in float32
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        cs = rows64[:, None] * stride_ct + dims[None, :]
        c = tl.load(cos_ptr + cs, mask=mask)
        s = tl.load(sin_ptr + cs, mask=mask)
        tl.store(dst, (f1 * c - f2 * s).to(x1.dtype), mask=mask)
        tl.store(dst + HALF, (f2 * c + f1 * s).to(x1.dtype), mask=mask)
    else:                                     # v: moved to the heads-major layout
        tl.store(dst, x1, mask=mask)
        tl.store(dst + HALF, x2, mask=mask)


def vision_rotary(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int):
    """The ViT's step between its qkv projection and attention in one launch (it was fourteen
    elementwise kernels a block): qkv (N, 3 * H * D) -> q, k, v (N, H, D), q and k rotated
    (layers.rotary.apply_rotary's float32 math), each a view of one heads-major (3, H, N, D)
    tensor, so attention reads every head contiguously. cos/sin (N, D) float32, halves equal."""
    n, width = qkv.shape
    d = width // (3 * heads)
    if width != 3 * heads * d or d % 2 or qkv.stride(1) != 1 or cos.shape != (n, d) or sin.stride() != cos.stride():
        raise ValueError(f"vision_rotary: qkv {tuple(qkv.shape)}, {heads} heads, cos {tuple(cos.shape)}")
    out = torch.empty(3, heads, n, d, dtype=qkv.dtype, device=qkv.device)
    if n:
        block_t = 32
        _vision_rotary_kernel[(triton.cdiv(n, block_t), 3 * heads)](
            qkv, cos, sin, out, n, heads, qkv.stride(0), cos.stride(0), HEAD_DIM=d, HALF=d // 2,
            HALF_P2=triton.next_power_of_2(d // 2), BLOCK_T=block_t)
    q, k, v = (t.transpose(0, 1) for t in out.unbind(0))
    return q, k, v


@triton.jit
def _mrope_cos_sin_kernel(pos_ptr, inv_ptr, axis_ptr, cos_ptr, sin_ptr, t, stride_pa, stride_ct,
                          HALF: tl.constexpr, BLOCK_T: tl.constexpr):
    """BLOCK_T tokens a program: frequency i of token r takes position axis_map[i]'s id, times
    inv_freq[i] (float32), and writes its cos and sin to columns i and HALF + i."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = (rows < t)[:, None]
    rows64 = rows.to(tl.int64)[:, None]
    dims = tl.arange(0, HALF)[None, :]
    axis = tl.load(axis_ptr + dims)
    p = tl.load(pos_ptr + axis * stride_pa + rows64, mask=ok, other=0)
    f = p.to(tl.float32) * tl.load(inv_ptr + dims)
    c, s = tl.cos(f), tl.sin(f)
    at = rows64 * stride_ct + dims
    tl.store(cos_ptr + at, c, mask=ok)
    tl.store(cos_ptr + at + HALF, c, mask=ok)
    tl.store(sin_ptr + at, s, mask=ok)
    tl.store(sin_ptr + at + HALF, s, mask=ok)


def mrope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, axis_map: torch.Tensor):
    """layers.rotary.mrope_cos_sin in one launch (there: six, ~10 us of a batch-1 decode step on an
    H200): positions (3, T) int64 -> cos, sin (T, 2 * len(inv_freq)) float32, the same values."""
    half = inv_freq.shape[0]
    t = positions.shape[1]
    if positions.dim() != 2 or positions.shape[0] != 3 or positions.stride(1) != 1 or axis_map.shape != (half,) \
            or half & (half - 1):
        raise ValueError(f"mrope_cos_sin: positions {tuple(positions.shape)} (3, T), rows contiguous; "
                         f"{half} frequencies (a power of two), axis map {tuple(axis_map.shape)}")
    cos = torch.empty(t, 2 * half, dtype=torch.float32, device=positions.device)
    sin = torch.empty_like(cos)
    if t:
        rows = 1 if t <= 32 else 16
        _mrope_cos_sin_kernel[(triton.cdiv(t, rows),)](
            positions, inv_freq, axis_map, cos, sin, t, positions.stride(0), cos.stride(0), HALF=half, BLOCK_T=rows,
            num_warps=1 if rows == 1 else 4)
    return cos, sin
