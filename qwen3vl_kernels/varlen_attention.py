"""Attention within each segment of a packed batch: bidirectional for the ViT's frames, causal
for new prompts packed into one prefill step (engine/prefill_graphs.py).

Grid: (segments, query heads, query blocks of the longest segment). Each program streams its
segment's keys in BLOCK_N tiles with an online softmax (causal: only the tiles up to its own
query block, the diagonal one masked). Grouped-query attention: q has GROUP heads to each of
k/v's. The head dim is padded to a power of two (the real ViT's is 72) and masked. (Splitting
72 into 64 + a 16-wide tail computed right in float32 but hit an illegal memory access in
bfloat16 on the H200 with Triton 3.6: not done.) q: (N, H, D); k, v: (N, H / GROUP, D);
cu_seqlens: (S + 1,) int32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .online_softmax import online_softmax_step

# launch shape on GPUs (benchmarks.kernels sweeps it at the ViT's shape); small tiles in the interpreter
CONFIG = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}
CPU_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}


@triton.jit
def _varlen_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, cu_ptr,
    scale, stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr = 1, CAUSAL: tl.constexpr = False,
):
    seg, head, qblk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(cu_ptr + seg)
    length = tl.load(cu_ptr + seg + 1) - start
    if qblk * BLOCK_M >= length:
        return
    rows = qblk * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < length
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    q_rows = (start + rows)[:, None].to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_rows + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    # causal: keys past the block's last row are no row's; every row sees key 0, so no row's
    # softmax is all masked
    end = tl.minimum(length, (qblk + 1) * BLOCK_M) if CAUSAL else length
    for kstart in range(0, end, BLOCK_N):
        cols = kstart + tl.arange(0, BLOCK_N)
        live = cols < length
        kv = (start + cols)[:, None].to(tl.int64) * stride_kt + (head // GROUP) * stride_kh + dims[None, :]
        k = tl.load(k_ptr + kv, mask=live[:, None] & dim_ok[None, :], other=0.0)
        v = tl.load(v_ptr + kv, mask=live[:, None] & dim_ok[None, :], other=0.0)
        seen = live[None, :] & (cols[None, :] <= rows[:, None]) if CAUSAL else live[None, :]
        m_i, l_i, acc = online_softmax_step(q, k, v, seen, scale, m_i, l_i, acc)
    o_rows = (start + rows)[:, None].to(tl.int64) * stride_ot + head * stride_oh
    tl.store(out_ptr + o_rows + dims[None, :], (acc / l_i[:, None]).to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens, scale: float) -> torch.Tensor:
    """Same contract as qwen3vl_backend.layers.attention.varlen_attention_torch."""
    if q.shape != k.shape or q.shape != v.shape or q.dim() != 3:
        raise ValueError(f"varlen_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must match (N, H, D)")
    cu = torch.as_tensor(cu_seqlens, dtype=torch.int32, device=q.device)
    lengths = cu[1:] - cu[:-1]
    max_len = int(lengths.max()) if isinstance(cu_seqlens, torch.Tensor) else max(
        b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]))
    return varlen_attention_bounded(q, k, v, cu, max_len, scale)


def varlen_attention_bounded(q, k, v, cu: torch.Tensor, max_len: int, scale: float,
                             config: dict | None = None, causal: bool = False) -> torch.Tensor:
    """The same with cu_seqlens already an int32 device tensor and a bound on the longest segment:
    no host sync, so a CUDA graph can hold it (empty segments and blocks past a segment return).
    `causal`: each segment's queries see its keys up to their own (a prompt's prefill); k and v
    may have fewer heads than q, a divisor of its (grouped-query attention)."""
    q = q if q.stride(-1) == 1 else q.contiguous()
    if k.stride() != v.stride() or k.stride(-1) != 1:          # views of one qkv row (qkv_prep_'s) are not copied
        k, v = k.contiguous(), v.contiguous()
    n, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != n or k.shape[2] != d or h % k.shape[1]:
        raise ValueError(f"varlen_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: k and v "
                         "must match, with q's tokens and head dim and a divisor of its heads")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    cfg = config or (CPU_CONFIG if q.device.type == "cpu" else CONFIG)
    grid = (cu.numel() - 1, h, triton.cdiv(max_len, cfg["BLOCK_M"]))
    _varlen_attention_kernel[grid](q, k, v, out, cu, scale, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                                   out.stride(0), out.stride(1),
                                   D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=cfg["BLOCK_M"],
                                   BLOCK_N=cfg["BLOCK_N"], GROUP=h // k.shape[1], CAUSAL=causal,
                                   num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out
