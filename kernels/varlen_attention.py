"""Bidirectional attention within each segment of a packed batch (the ViT's frames).

Grid: (segments, heads, query blocks of the longest segment). Each program streams its
segment's keys in BLOCK_N tiles with an online softmax. The head dim is padded to a power of
two (the real ViT's is 72) and masked. q, k, v: (N, H, D); cu_seqlens: (S + 1,) int32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .online_softmax import online_softmax_step


@triton.jit
def _varlen_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, cu_ptr,
    scale, D,
    stride_t, stride_h,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seg, head, qblk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(cu_ptr + seg)
    length = tl.load(cu_ptr + seg + 1) - start
    if qblk * BLOCK_M >= length:
        return
    rows = qblk * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dmask = dims < D
    base = (start + rows)[:, None].to(tl.int64) * stride_t + head * stride_h + dims[None, :]
    q = tl.load(q_ptr + base, mask=(rows < length)[:, None] & dmask[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for kstart in range(0, length, BLOCK_N):
        cols = kstart + tl.arange(0, BLOCK_N)
        live = cols < length
        kv = (start + cols)[:, None].to(tl.int64) * stride_t + head * stride_h + dims[None, :]
        k = tl.load(k_ptr + kv, mask=live[:, None] & dmask[None, :], other=0.0)
        v = tl.load(v_ptr + kv, mask=live[:, None] & dmask[None, :], other=0.0)
        m_i, l_i, acc = online_softmax_step(q, k, v, live, scale, m_i, l_i, acc)
    tl.store(out_ptr + base, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty),
             mask=(rows < length)[:, None] & dmask[None, :])


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens, scale: float) -> torch.Tensor:
    """Same contract as qwen3vl_backend.layers.attention.varlen_attention_torch."""
    if q.shape != k.shape or q.shape != v.shape or q.dim() != 3:
        raise ValueError(f"varlen_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must match (N, H, D)")
    cu = torch.as_tensor(cu_seqlens, dtype=torch.int32, device=q.device)
    lengths = cu[1:] - cu[:-1]
    max_len = int(lengths.max()) if isinstance(cu_seqlens, torch.Tensor) else max(
        b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]))
    return varlen_attention_bounded(q, k, v, cu, max_len, scale)


def varlen_attention_bounded(q, k, v, cu: torch.Tensor, max_len: int, scale: float) -> torch.Tensor:
    """The same with cu_seqlens already an int32 device tensor and a bound on the longest segment:
    no host sync, so a CUDA graph can hold it (empty segments and blocks past a segment return)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    n, h, d = q.shape
    block_m = 32 if q.device.type == "cpu" else 64
    grid = (cu.numel() - 1, h, triton.cdiv(max_len, block_m))
    _varlen_attention_kernel[grid](q, k, v, out, cu, scale, d, q.stride(0), q.stride(1),
                                   BLOCK_M=block_m, BLOCK_N=32 if q.device.type == "cpu" else 64,
                                   BLOCK_D=max(16, triton.next_power_of_2(d)), num_warps=4, num_stages=2)
    return out
