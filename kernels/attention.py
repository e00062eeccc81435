"""Paged decode attention: one query token per sequence against its KV blocks.

One program per (sequence, KV head) handles that head's whole query group at once (GQA: the
group's rows share every K/V load), streaming over the sequence's cache blocks with an online
softmax. The group is padded to 16 rows, the smallest tile `tl.dot` takes.
Cache layout per layer: (2, num_blocks, block_size, Hkv, D), K then V.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .online_softmax import online_softmax_step


@triton.jit
def _paged_decode_kernel(
    # pointers
    q_ptr, cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr,
    # scalars
    scale, GROUP,
    # strides
    stride_qt, stride_qh, stride_ckv, stride_cb, stride_cs, stride_ch, stride_bt, stride_ot, stride_oh,
    # meta
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, GROUP_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    ctx = tl.load(context_lens_ptr + seq)
    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + rows
    row_ok = rows < GROUP
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + dims[None, :], mask=row_ok[:, None], other=0.0)
    m_i = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), tl.float32)
    slots = tl.arange(0, BLOCK_SIZE)
    for blk in range(0, tl.cdiv(ctx, BLOCK_SIZE)):
        phys = tl.load(block_tables_ptr + seq * stride_bt + blk).to(tl.int64)
        base = cache_ptr + phys * stride_cb + kvh * stride_ch + slots[:, None] * stride_cs + dims[None, :]
        live = blk * BLOCK_SIZE + slots < ctx
        k = tl.load(base, mask=live[:, None], other=0.0)
        v = tl.load(base + stride_ckv, mask=live[:, None], other=0.0)
        m_i, l_i, acc = online_softmax_step(q, k, v, live, scale, m_i, l_i, acc)
    out = acc / l_i[:, None]
    tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def paged_decode_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """q (S, H, D), cache (2, NB, BS, Hkv, D), block_tables (S, max_blocks) int32, context_lens (S,) int32."""
    s, h, d = q.shape
    _, _, bs, hkv, d2 = cache.shape
    if d2 != d or h % hkv or block_tables.shape[0] != s or context_lens.shape[0] != s:
        raise ValueError(f"paged_decode_attention shapes disagree: q {tuple(q.shape)}, cache {tuple(cache.shape)}, "
                         f"block_tables {tuple(block_tables.shape)}, context_lens {tuple(context_lens.shape)}")
    if bs < 16 or bs & (bs - 1):
        raise ValueError(f"paged_decode_attention: block size {bs}: needs a power of two >= 16 (tl.dot tiles)")
    if q.stride(-1) != 1 or cache.stride(-1) != 1:
        raise ValueError("paged_decode_attention needs the head dim contiguous")
    group = h // hkv
    out = torch.empty_like(q) if out is None else out
    _paged_decode_kernel[(s, hkv)](
        q, cache, block_tables, context_lens, out,
        scale, group,
        q.stride(0), q.stride(1), cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3),
        block_tables.stride(0), out.stride(0), out.stride(1),
        HEAD_DIM=d, BLOCK_SIZE=bs, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        num_warps=4, num_stages=2,
    )
    return out


def paged_decode_attention_reference(q, cache, block_tables, context_lens, scale) -> torch.Tensor:
    """Plain PyTorch, float32: gather each sequence's keys and values and attend."""
    s, h, d = q.shape
    bs, hkv = cache.shape[2], cache.shape[3]
    out = torch.empty(s, h, d, dtype=torch.float32, device=q.device)
    for i in range(s):
        ctx = int(context_lens[i])
        blocks = block_tables[i, : -(-ctx // bs)].long()
        k = cache[0, blocks].flatten(0, 1)[:ctx].float().repeat_interleave(h // hkv, dim=1)
        v = cache[1, blocks].flatten(0, 1)[:ctx].float().repeat_interleave(h // hkv, dim=1)
        p = torch.softmax(torch.einsum("hd,thd->ht", q[i].float(), k) * scale, dim=-1)
        out[i] = torch.einsum("ht,thd->hd", p, v)
    return out.to(q.dtype)
