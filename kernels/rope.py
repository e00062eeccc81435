"""Rotary embedding applied to q and k in one launch (rotate-half layout, float32 math).

cos/sin (T, D) are the per-token tables (mRoPE already folded in); their two halves are equal,
so only the first half is read. q (T, H, D) and k (T, Hkv, D) are rotated in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, n_heads, stride_xt, stride_xh, stride_ct,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    hb = tl.program_id(1)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < n_heads) & (dims[None, :] < HALF)
    c = tl.load(cos_ptr + t * stride_ct + dims, mask=dims < HALF, other=0.0)[None, :]
    s = tl.load(sin_ptr + t * stride_ct + dims, mask=dims < HALF, other=0.0)[None, :]
    base = x_ptr + t.to(tl.int64) * stride_xt + heads[:, None] * stride_xh + dims[None, :]
    x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(base, (x1 * c - x2 * s).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(base + HALF, (x2 * c + x1 * s).to(x_ptr.dtype.element_ty), mask=mask)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (T, heads, D) in place; cos/sin (T, D) float32. Returns x."""
    t, h, d = x.shape
    if cos.shape != (t, d) or sin.shape != (t, d) or d % 2 or x.stride(-1) != 1 or cos.stride(-1) != 1:
        raise ValueError(f"rope_: x {tuple(x.shape)} (last dim contiguous, even) vs cos/sin {tuple(cos.shape)}")
    if t == 0:
        return x
    block_h = min(16, triton.next_power_of_2(h))
    _rope_kernel[(t, triton.cdiv(h, block_h))](x, cos, sin, h, x.stride(0), x.stride(1), cos.stride(0),
                                              HALF=d // 2, BLOCK_H=block_h, BLOCK_D=triton.next_power_of_2(d // 2))
    return x


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The layers' entry point: same contract as qwen3vl_backend.layers.rotary.apply_rotary on q and k."""
    return rope_(q.contiguous(), cos, sin), rope_(k.contiguous(), cos, sin)
