"""Greedy sampling's argmax over a batch's logits rows, in two short launches.

torch's argmax reduces each row in one block: 8.3 us of a batch-1 decode step on an H200 for one
151,936-wide row (after a 3.7 us float32 copy the sampler no longer makes). Here each row is
split over PARTS programs (each one load of its chunk), then one program a row picks among their
maxima. Ties go to the lowest index, as torch's argmax (its first maximal value); a NaN is passed
over (torch would return it: the logits of a working model hold none).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PARTS = 64          # programs a row in the first launch


@triton.jit
def _argmax_parts_kernel(x_ptr, vals_ptr, idx_ptr, V, stride_xm, CHUNK, BLOCK: tl.constexpr, PARTS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    offs = part * CHUNK + tl.arange(0, BLOCK)
    ok = (offs < V) & (tl.arange(0, BLOCK) < CHUNK)
    x = tl.load(x_ptr + row * stride_xm + offs, mask=ok, other=float("-inf")).to(tl.float32)
    x = tl.where(x == x, x, float("-inf"))
    best, at = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(vals_ptr + row * PARTS + part, best)
    tl.store(idx_ptr + row * PARTS + part, part * CHUNK + at)


@triton.jit
def _argmax_pick_kernel(vals_ptr, idx_ptr, out_ptr, PARTS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    parts = tl.arange(0, PARTS)
    vals = tl.load(vals_ptr + row * PARTS + parts)
    _, part = tl.max(vals, 0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(out_ptr + row, tl.load(idx_ptr + row * PARTS + part).to(tl.int64))


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """logits (B, V), last dim contiguous -> (B,) int64: each row's first maximal index."""
    b, v = logits.shape
    if logits.stride(1) != 1 or not v:
        raise ValueError(f"argmax_rows: logits {tuple(logits.shape)} with the vocabulary contiguous")
    out = torch.empty(b, dtype=torch.int64, device=logits.device)
    if b:
        chunk = triton.cdiv(v, PARTS)
        vals = torch.empty(b, PARTS, dtype=torch.float32, device=logits.device)
        idx = torch.empty(b, PARTS, dtype=torch.int32, device=logits.device)
        block = triton.next_power_of_2(chunk)
        _argmax_parts_kernel[(b, PARTS)](logits, vals, idx, v, logits.stride(0), chunk, BLOCK=block, PARTS=PARTS,
                                         num_warps=4 if block >= 1024 else 1)
        _argmax_pick_kernel[(b,)](vals, idx, out, PARTS=PARTS, num_warps=1)
    return out
