"""torch's uint8 antialiased bicubic resize, as integer tensor ops that run on any device.

On the CPU, `F.interpolate(uint8, mode="bicubic", antialias=True)` (what transformers' image
processor and vision_inputs._resize run) filters in fixed point: each axis's weights come from
PIL's cubic (a = -0.5) stretched by the scale when shrinking, normalised in float64, then rounded
to int16 at the largest precision that keeps the axis's biggest weight under 2^15; an output
sample is the integer dot product of its taps plus half a unit, shifted down and clamped to 0-255.
The width is filtered first, into uint8, then the height. CUDA's interpolate has no such path (it
filters in float), so the same integer arithmetic is written here as gathers, products and sums:
on a GPU it gives the CPU's values bit for bit (tests compare it with F.interpolate at many
shapes), where a served image can be resized beside the ViT instead of on a host core.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

_A = -0.5       # the cubic's parameter (Keys; PIL's and torch's antialiased bicubic)


def _cubic(x: np.ndarray) -> np.ndarray:
    """The cubic filter, in torch's order of operations (float64, as its weights are computed)."""
    x = np.abs(x)
    near = ((_A + 2.0) * x - (_A + 3.0)) * x * x + 1.0
    far = ((_A * x - 5.0 * _A) * x + 8.0 * _A) * x - 4.0 * _A
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=64)
def aa_bicubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """One axis: each output sample's first input index (out,), its integer weights (out, taps)
    (zero past the sample's own taps) and the precision (bits) they are scaled to. Vectorised
    over the output samples with torch's scalar operations in its order (each sample's weights
    summed tap by tap, not pairwise), so the float64 values are its own: a new image size costs
    ~0.1 ms here, where a Python loop took milliseconds."""
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    taps = int(np.ceil(support)) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(out_size, dtype=np.int64) + 0.5)
    starts = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)     # C's casts: toward zero
    ends = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size)
    sizes = np.clip(ends - starts, 0, taps)
    j = np.arange(taps, dtype=np.int64)
    real = np.where(j[None, :] < sizes[:, None],
                    _cubic(((j[None, :] + starts[:, None]) - center[:, None] + 0.5) * invscale), 0.0)
    total = np.zeros(out_size)
    for t in range(taps):
        total = total + real[:, t]
    nonzero = total != 0.0
    real = np.where(nonzero[:, None], real / np.where(nonzero, total, 1.0)[:, None], real)
    wt_max = max(0.0, float(real[nonzero].max())) if nonzero.any() else 0.0
    precision = 0
    while precision < 22 and int(0.5 + wt_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = real * (1 << precision)
    weights = np.where(scaled < 0, (-0.5 + scaled).astype(np.int64), (0.5 + scaled).astype(np.int64))
    return starts, weights.astype(np.int32), precision


@functools.lru_cache(maxsize=64)
def _taps_on(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    starts, weights, precision = aa_bicubic_taps(in_size, out_size)
    taps = weights.shape[1]
    # each tap's input index, clamped: a tap past a sample's own has weight 0
    index = np.minimum(starts[:, None] + np.arange(taps)[None, :], in_size - 1)
    return (torch.from_numpy(index).to(device), torch.from_numpy(weights).to(device), precision)


GATHER_ELEMENTS = 1 << 26     # every tap gathered at once up to this many int32 values (256 MB)


def _filter(x: torch.Tensor, out_size: int, dim: int) -> torch.Tensor:
    """One axis (`dim` of a uint8 tensor) resampled to `out_size`, in uint8: every output sample's
    taps gathered at once (a handful of launches), or tap by tap where that would be too large."""
    index, weights, precision = _taps_on(x.shape[dim], out_size, x.device)
    taps = weights.shape[1]
    if x.numel() // x.shape[dim] * out_size * taps <= GATHER_ELEMENTS:
        gathered = x.index_select(dim, index.flatten()).to(torch.int32)
        shape = (*x.shape[:dim], out_size, taps, *x.shape[dim + 1:])
        tail = (1,) * (x.dim() - dim - 1)
        acc = (gathered.view(shape) * weights.view(out_size, taps, *tail)).sum(dim + 1, dtype=torch.int32)
    else:
        shape = [1] * x.dim()
        shape[dim] = out_size
        acc = None
        for t in range(taps):
            term = x.index_select(dim, index[:, t]).to(torch.int32) * weights[:, t].view(shape)
            acc = term if acc is None else acc.add_(term)
    acc.add_(1 << (precision - 1)).bitwise_right_shift_(precision)
    return acc.clamp_(0, 255).to(torch.uint8)


def resize_uint8(frames: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """frames (..., H, W) uint8, on any device -> (..., h, w) uint8: F.interpolate(mode="bicubic",
    antialias=True)'s values on the CPU, the width first."""
    if frames.dtype != torch.uint8:
        raise ValueError(f"resize_uint8 takes uint8 frames, not {frames.dtype}")
    if frames.shape[-1] != w:
        frames = _filter(frames, w, frames.dim() - 1)
    if frames.shape[-2] != h:
        frames = _filter(frames, h, frames.dim() - 2)
    return frames
