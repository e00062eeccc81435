"""Block-scaled FP8 (e4m3) as Qwen's FP8 releases store it, with PyTorch references.

Weights W (N, K) are stored as Wq float8_e4m3fn (N, K) and `weight_scale_inv` S float32
(ceil(N/bn), ceil(K/bk)): W[n, k] = Wq[n, k] * S[n // bn, k // bk]; edge blocks are partial.
Activations are quantized dynamically, per token and per bk-wide group of its features, with
scale = amax / 448 (e4m3's largest finite value). The W8A8 product is then
sum over k-groups g of (Xq_g . Wq_g^T) * xs[t, g] * S[n // bn, g].

Shapes: T = tokens, N = output features, K = input features, bn x bk = the block.
These are the references the GPU kernels are checked against; on CPU the layers run them.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def scale_grid(n: int, k: int, block: tuple[int, int]) -> tuple[int, int]:
    return -(-n // block[0]), -(-k // block[1])


def quantize_weight_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """W (N, K) -> (Wq fp8 (N, K), S float32 (ceil(N/bn), ceil(K/bk))) with each block's amax at 448."""
    n, k = w.shape
    bn, bk = block
    gn, gk = scale_grid(n, k, block)
    padded = torch.zeros(gn * bn, gk * bk, dtype=torch.float32, device=w.device)
    padded[:n, :k] = w.float()
    blocks = padded.view(gn, bn, gk, bk)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = amax / FP8_MAX
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(gn * bn, gk * bk)[:n, :k]
    return q.to(FP8), scale


def dequantize_weight_blocks(wq: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Wq (N, K) fp8 and S (ceil(N/bn), ceil(K/bk)) -> W (N, K) in `dtype`."""
    n, k = wq.shape
    if tuple(scale.shape) != scale_grid(n, k, block):
        raise ValueError(f"scale grid {tuple(scale.shape)} does not match a ({n}, {k}) weight in {block} blocks")
    s = scale.repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]
    return (wq.float() * s).to(dtype)


def quantize_activations(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """X (T, K) -> (Xq fp8 (T, K), xs float32 (T, ceil(K/group))): per token, per group of features."""
    t, k = x.shape
    g = -(-k // group)
    padded = torch.zeros(t, g * group, dtype=torch.float32, device=x.device)
    padded[:, :k] = x.float()
    groups = padded.view(t, g, group)
    scale = groups.abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX
    q = (groups / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).view(t, g * group)[:, :k]
    return q.to(FP8), scale


def w8a8_block_linear_reference(x: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                                bias: torch.Tensor | None = None) -> torch.Tensor:
    """Y = X W^T with X quantized per (token, bk group) and W per block; accumulated in float32,
    returned in X's dtype. X (T, K) or (..., K)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xq, xs = quantize_activations(x2, block[1])
    xd = xq.float() * xs.repeat_interleave(block[1], 1)[:, : x2.shape[1]]
    y = xd @ dequantize_weight_blocks(wq, scale, block).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], wq.shape[0])
