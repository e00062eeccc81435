"""LayerNorm after a residual add, in one launch: the ViT's blocks (x + attn, then norm2; x + mlp,
then the next block's norm1), where PyTorch runs an add and a LayerNorm, each a pass over the
stream. One program per row; statistics in float32 (mean, then the centred sum of squares), the
affine step in float32, the output rounded once. The sum x + delta is rounded to x's dtype first,
as PyTorch's add is, so the stream written back equals PyTorch's bit for bit; the normalised rows
may differ from PyTorch's LayerNorm in the last bit (its statistics are Welford's).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_layer_norm_kernel(x_ptr, d_ptr, w_ptr, b_ptr, h_ptr, s_ptr, n_cols, eps, stride_x, stride_d, stride_h,
                           stride_s, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_DELTA:
        x = (x.to(tl.float32) + tl.load(d_ptr + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(s_ptr + row * stride_s + cols, x, mask=mask)
    xf = x.to(tl.float32)
    mean = tl.sum(xf, 0) / n_cols
    centred = tl.where(mask, xf - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(h_ptr + row * stride_h + cols, (centred * rstd * w + b).to(h_ptr.dtype.element_ty), mask=mask)


def add_layer_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, delta (N, D) -> (LayerNorm(s), s) with s = x + delta (x itself without delta), both
    new tensors of x's dtype (x and delta are not written)."""
    if (x.dim() != 2 or x.stride(-1) != 1 or weight.shape != (x.shape[1],) or bias.shape != weight.shape
            or (delta is not None and (delta.shape != x.shape or delta.stride(-1) != 1))):
        raise ValueError(f"add_layer_norm: x {tuple(x.shape)}, delta {None if delta is None else tuple(delta.shape)}, "
                         f"weight {tuple(weight.shape)}: rows of weight's width, the last dim contiguous")
    n, d = x.shape
    h = torch.empty_like(x, memory_format=torch.contiguous_format)
    s = torch.empty_like(h) if delta is not None else x
    if n:
        block = triton.next_power_of_2(d)
        _add_layer_norm_kernel[(n,)](x, delta if delta is not None else x, weight, bias, h, s, d, eps, x.stride(0),
                                     (delta if delta is not None else x).stride(0), h.stride(0), s.stride(0),
                                     HAS_DELTA=delta is not None, BLOCK=block, num_warps=4 if block <= 2048 else 8)
    return h, s


def add_layer_norm_reference(x, delta, weight, bias, eps):
    s = x if delta is None else x + delta
    return torch.nn.functional.layer_norm(s, (s.shape[-1],), weight, bias, eps), s
