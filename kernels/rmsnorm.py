"""RMSNorm (optionally after a residual add): one program per row, statistics in float32.

With a residual, `x + residual` is both normalised and written back to `residual`, the fused
form decoder layers use (one read and one write of the stream instead of three passes).
`rmsnorm_quantized` also hands the next GEMM its W8A8 input: the normalised row quantized per
group to e4m3 (kernels.fp8.quantize_activations_fp8's values, from the row as stored), which saves
that launch (kernels.switches.NORM_QUANT).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import switches
from .linear import e4m3_groups
from .pdl import gdc_enter, pdl


@triton.jit
def _rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, n_cols, eps, stride_x, stride_r, stride_o,
                    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False,
                    q_ptr=None, s_ptr=None, stride_q=0, stride_s=0, GROUP: tl.constexpr = 0):
    """GROUP (> 0, dividing BLOCK == n_cols: rmsnorm_quantized's rows): the stored row also
    quantized per GROUP columns into q_ptr (e4m3) and s_ptr (float32 scales, amax / 448) by the
    quantize launches' own arithmetic (kernels.linear.e4m3_groups)."""
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
    y = ((xf * rstd).to(x.dtype) * w).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + cols, y, mask=mask)
    if GROUP > 0:
        q, scale = e4m3_groups(tl.reshape(y.to(tl.float32), (BLOCK // GROUP, GROUP)))
        q_cols = tl.reshape(cols, (BLOCK // GROUP, GROUP))
        tl.store(q_ptr + row * stride_q + q_cols, q.to(q_ptr.dtype.element_ty))
        tl.store(s_ptr + row * stride_s + tl.arange(0, BLOCK // GROUP), scale)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., D) -> normalised (..., D). With `residual`, it is updated in place to x + residual."""
    return _launch(x, weight, eps, residual, 0)[0]


def quantizes_in_norm(d: int, group: int) -> bool:
    """Whether rmsnorm_quantized can quantize rows of d columns in its launch: d a power of two
    (one tile a row) made of whole groups, or shorter than one (a row is one partial group)."""
    return d == triton.next_power_of_2(d) and (d % group == 0 or d < group)


def rmsnorm_quantized(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
                      group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rmsnorm's (T, D) output, and it quantized per token and group: (out, q e4m3 (T, D), scales
    float32 (T, ceil(D / group))), q and scales bit for bit kernels.fp8.quantize_launch(out, group).
    D must pass quantizes_in_norm."""
    if x.dim() != 2 or not quantizes_in_norm(x.shape[1], group):
        raise ValueError(f"rmsnorm_quantized: x {tuple(x.shape)} is not (T, D) with D a power of two "
                         f"in {group}-wide groups")
    return _launch(x, weight, eps, residual, min(group, x.shape[1]))


def _launch(x, weight, eps, residual, group):
    if x.shape[-1] != weight.shape[0] or x.stride(-1) != 1:
        raise ValueError(f"rmsnorm: x {tuple(x.shape)} (last dim contiguous) vs weight {tuple(weight.shape)}")
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(x2)
    res = residual.view(-1, x.shape[-1]) if residual is not None else x2
    if residual is not None and (res.shape != x2.shape or res.stride(-1) != 1):
        raise ValueError("rmsnorm: residual must match x")
    q = s = None
    if group:
        q = torch.empty(x2.shape, dtype=torch.float8_e4m3fn, device=x2.device)
        s = torch.empty(x2.shape[0], x2.shape[1] // group, dtype=torch.float32, device=x2.device)
    _rmsnorm_kernel[(x2.shape[0],)](x2, res, weight, out, x2.shape[1], eps, x2.stride(0), res.stride(0),
                                    out.stride(0), HAS_RESIDUAL=residual is not None,
                                    BLOCK=triton.next_power_of_2(x2.shape[1]),
                                    num_warps=switches.warps("rmsnorm", 8 if x2.shape[1] >= 2048 else 4),
                                    q_ptr=q, s_ptr=s, stride_q=q.stride(0) if group else 0,
                                    stride_s=s.stride(0) if group else 0, GROUP=group, **pdl(x2))
    return out.view_as(x), q, s


def rmsnorm_reference(x, weight, eps, residual=None):
    if residual is not None:
        x = x + residual
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
