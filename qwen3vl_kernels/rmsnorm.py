"""RMSNorm (optionally after a residual add): one program per row, statistics in float32.

With a residual, `x + residual` is both normalised and written back to `residual`, the fused
form decoder layers use (one read and one write of the stream instead of three passes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import switches
from .pdl import gdc_enter, pdl


@triton.jit
def _rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, n_cols, eps, stride_x, stride_r, stride_o,
                    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    gdc_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        tl.store(res_ptr + row * stride_r + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = (xf * rstd).to(x.dtype) * w
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., D) -> normalised (..., D). With `residual`, it is updated in place to x + residual."""
    if x.shape[-1] != weight.shape[0] or x.stride(-1) != 1:
        raise ValueError(f"rmsnorm: x {tuple(x.shape)} (last dim contiguous) vs weight {tuple(weight.shape)}")
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(x2)
    res = residual.view(-1, x.shape[-1]) if residual is not None else x2
    if residual is not None and (res.shape != x2.shape or res.stride(-1) != 1):
        raise ValueError("rmsnorm: residual must match x")
    _rmsnorm_kernel[(x2.shape[0],)](x2, res, weight, out, x2.shape[1], eps, x2.stride(0), res.stride(0),
                                    out.stride(0), HAS_RESIDUAL=residual is not None,
                                    BLOCK=triton.next_power_of_2(x2.shape[1]),
                                    num_warps=switches.warps("rmsnorm", 8 if x2.shape[1] >= 2048 else 4),
                                    **pdl(x2))
    return out.view_as(x)


def rmsnorm_reference(x, weight, eps, residual=None):
    if residual is not None:
        x = x + residual
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
