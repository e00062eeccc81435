"""Bidirectional attention within each segment of a packed batch (the ViT's frames).

Grid: (segments, heads, query blocks of the longest segment). Each program streams its
segment's keys in BLOCK_N tiles with an online softmax. A head dim that is not a power of two
(the real ViT's is 72) is split into a power-of-two main part and a small padded tail (64 + 16
for 72), so the dots do 80 columns of work instead of 128. q, k, v: (N, H, D); cu_seqlens:
(S + 1,) int32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# launch shape on GPUs (benchmarks.kernels sweeps it at the ViT's shape); small tiles in the interpreter
CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
CPU_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}


@triton.jit
def _varlen_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, cu_ptr,
    scale, stride_t, stride_h,
    D: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    seg, head, qblk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(cu_ptr + seg)
    length = tl.load(cu_ptr + seg + 1) - start
    if qblk * BLOCK_M >= length:
        return
    rows = qblk * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < length
    main = tl.arange(0, D_MAIN)
    main_ok = main < D                        # all true unless D is under 16
    tail = D_MAIN + tl.arange(0, D_TAIL if D_TAIL > 0 else 16)
    tail_ok = tail < D
    q_rows = (start + rows)[:, None].to(tl.int64) * stride_t + head * stride_h
    q1 = tl.load(q_ptr + q_rows + main[None, :], mask=row_ok[:, None] & main_ok[None, :], other=0.0)
    if D_TAIL > 0:
        q2 = tl.load(q_ptr + q_rows + tail[None, :], mask=row_ok[:, None] & tail_ok[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc1 = tl.zeros((BLOCK_M, D_MAIN), tl.float32)
    acc2 = tl.zeros((BLOCK_M, D_TAIL if D_TAIL > 0 else 16), tl.float32)
    for kstart in range(0, length, BLOCK_N):
        cols = kstart + tl.arange(0, BLOCK_N)
        live = cols < length
        kv_rows = (start + cols)[:, None].to(tl.int64) * stride_t + head * stride_h
        k1 = tl.load(k_ptr + kv_rows + main[None, :], mask=live[:, None] & main_ok[None, :], other=0.0)
        s = tl.dot(q1, tl.trans(k1))
        if D_TAIL > 0:
            k2 = tl.load(k_ptr + kv_rows + tail[None, :], mask=live[:, None] & tail_ok[None, :], other=0.0)
            s += tl.dot(q2, tl.trans(k2))
        s = tl.where(live[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v1 = tl.load(v_ptr + kv_rows + main[None, :], mask=live[:, None] & main_ok[None, :], other=0.0)
        acc1 = acc1 * alpha[:, None] + tl.dot(p.to(v1.dtype), v1)
        if D_TAIL > 0:
            v2 = tl.load(v_ptr + kv_rows + tail[None, :], mask=live[:, None] & tail_ok[None, :], other=0.0)
            acc2 = acc2 * alpha[:, None] + tl.dot(p.to(v2.dtype), v2)
        m_i = m_new
    tl.store(out_ptr + q_rows + main[None, :], (acc1 / l_i[:, None]).to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & main_ok[None, :])
    if D_TAIL > 0:
        tl.store(out_ptr + q_rows + tail[None, :], (acc2 / l_i[:, None]).to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & tail_ok[None, :])


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens, scale: float) -> torch.Tensor:
    """Same contract as qwen3vl_backend.layers.attention.varlen_attention_torch."""
    if q.shape != k.shape or q.shape != v.shape or q.dim() != 3:
        raise ValueError(f"varlen_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must match (N, H, D)")
    cu = torch.as_tensor(cu_seqlens, dtype=torch.int32, device=q.device)
    lengths = cu[1:] - cu[:-1]
    max_len = int(lengths.max()) if isinstance(cu_seqlens, torch.Tensor) else max(
        b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]))
    return varlen_attention_bounded(q, k, v, cu, max_len, scale)


SPLIT_HEAD_DIM = True      # False: pad the head dim to the next power of two instead


def head_dim_split(d: int) -> tuple[int, int]:
    """d -> (power-of-two main part, padded tail or 0): 72 -> (64, 16), 128 -> (128, 0), 24 -> (16, 16)."""
    if not SPLIT_HEAD_DIM:
        return max(16, triton.next_power_of_2(d)), 0
    main = 1 << (d.bit_length() - 1)
    if main == d and d >= 16:
        return d, 0
    main = max(16, main)
    return main, (0 if main >= d else max(16, triton.next_power_of_2(d - main)))


def varlen_attention_bounded(q, k, v, cu: torch.Tensor, max_len: int, scale: float,
                             config: dict | None = None) -> torch.Tensor:
    """The same with cu_seqlens already an int32 device tensor and a bound on the longest segment:
    no host sync, so a CUDA graph can hold it (empty segments and blocks past a segment return)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    n, h, d = q.shape
    cfg = config or (CPU_CONFIG if q.device.type == "cpu" else CONFIG)
    d_main, d_tail = head_dim_split(d)
    grid = (cu.numel() - 1, h, triton.cdiv(max_len, cfg["BLOCK_M"]))
    _varlen_attention_kernel[grid](q, k, v, out, cu, scale, q.stride(0), q.stride(1),
                                   D=d, D_MAIN=d_main, D_TAIL=d_tail, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                                   num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out
