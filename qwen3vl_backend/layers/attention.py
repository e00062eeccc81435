"""Causal attention over a paged KV cache: the batch's one metadata carrier and the torch path.

A step's batch is flat: T new tokens from S sequences laid end to end. Each sequence's keys and
values live in fixed-size blocks of a per-layer cache `(2, num_blocks, block_size, Hkv, D)`;
`block_tables[s]` lists sequence s's blocks in order and `slot_mapping[t]` is the flat slot
(block * block_size + offset) where new token t's K/V are written. The same carrier serves
prefill (query_len > 1, possibly after a cached prefix), decode (query_len == 1) and both mixed.

An fp8 cache (`--kv-cache-dtype fp8_e4m3`) holds each K/V value as float8 e4m3, rounded to
nearest and saturated at +-448 (qwen3vl_kernels.fp8.FP8_MAX), with no scale: Qwen3's keys leave a per-head
RMSNorm (unit RMS times its weights), and Qwen's FP8 configs name no KV scales (SGLang and vLLM
take 1.0 then too). Readers widen it: the torch path to the queries' dtype, the decode kernel to
float16 for bf16 queries. A prompt's own prefill attends to its new keys in the model's dtype;
decode steps, and a later prompt's cached prefix, read the cache's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from qwen3vl_kernels.fp8 import FP8, FP8_MAX

# SDPA's backends in the order it tries them, cuDNN's first. torch 2.11 tries FlashAttention-2
# first; at the ViT's head dim 72 cuDNN's kernel is the faster (tenth session, H200: a 1280x720
# image's ViT 13.6 ms against 18-19 with flash), but it builds a plan for each sequence length
# at first sight (~65 ms). So it is asked for only where a shape is planned once and then
# replayed: the ViT's exact-grid CUDA graphs (engine/vision_graphs.py).
CUDNN_FIRST = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def sdpa_priority(order) -> contextlib.AbstractContextManager:
    """SDPA tries `order`'s backends first, in that order, inside the block; None: as it is."""
    return sdpa_kernel(list(order), set_priority=True) if order else contextlib.nullcontext()


@dataclass
class AttentionMetadata:
    query_lens: list[int]          # (S,) new tokens per sequence this step
    context_lens: list[int]        # (S,) tokens in the cache per sequence after this step
    slot_mapping: torch.Tensor     # (T,) int64 flat cache slot of each new token
    block_tables: torch.Tensor     # (S, max_blocks) int32, -1 padded
    block_size: int
    context_lens_t: torch.Tensor | None = None   # (S,) int32 on the device, for the kernels
    # new prompts packed into one prefill graph (engine/prefill_graphs.py): (segments + 1,) int32
    # segment starts on the device, each segment causal on its own keys (nothing cached before
    # them), and a bound on the longest; query_lens then hold the graph's bucket alone
    cu_seqlens_t: torch.Tensor | None = None
    max_query_len: int = 0

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens)


def kv_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as the cache stores it: float8 saturated at +-FP8_MAX (never NaN), else a plain cast."""
    if dtype == FP8:
        return x.clamp(-FP8_MAX, FP8_MAX).to(dtype)
    return x.to(dtype)


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """cache (2, NB, BS, Hkv, D); k, v (T, Hkv, D)."""
    flat = cache.view(2, -1, *cache.shape[-2:])
    k, v = kv_cast(k, cache.dtype), kv_cast(v, cache.dtype)
    if cache.dtype == FP8:         # index_copy_ has no float8 kernels: copied as bytes
        flat, k, v = flat.view(torch.uint8), k.view(torch.uint8), v.view(torch.uint8)
    flat[0].index_copy_(0, slot_mapping, k)
    flat[1].index_copy_(0, slot_mapping, v)


def paged_attention_torch(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, cache: torch.Tensor,
                          meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q (T, H, D) against each sequence's cached keys -> (T, H, D). Plain PyTorch reference.

    A sequence with nothing cached before this chunk attends causally over its new keys directly
    (SDPA's fused path); one with a cached prefix gathers its blocks and uses an explicit mask.
    """
    out = torch.empty_like(q)
    start = 0
    for s, (qlen, ctx) in enumerate(zip(meta.query_lens, meta.context_lens)):
        if qlen == ctx:
            sl = slice(start, start + qlen)
            o = _sdpa(q[sl], k_new[sl].to(q.dtype), v_new[sl].to(q.dtype), is_causal=True, scale=scale,
                      enable_gqa=True)
            out[sl] = o
            start += qlen
            continue
        nblocks = -(-ctx // meta.block_size)
        blocks = meta.block_tables[s, :nblocks].long()
        k = cache[0, blocks].flatten(0, 1)[:ctx]                               # (ctx, Hkv, D)
        v = cache[1, blocks].flatten(0, 1)[:ctx]
        qs = q[start : start + qlen]
        # query j sits at absolute position ctx - qlen + j and sees keys 0..that position
        qpos = torch.arange(ctx - qlen, ctx, device=q.device)[:, None]
        mask = torch.arange(ctx, device=q.device)[None, :] <= qpos
        out[start : start + qlen] = _sdpa(qs, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale,
                                          enable_gqa=True)
        start += qlen
    return out


def packed_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                             scale: float) -> torch.Tensor:
    """q (T, H, D) of fresh prompts packed by meta.cu_seqlens_t, each causal over its own new keys
    (Triton's kernel: the segment table stays on the device, so a CUDA graph holds the step)."""
    from qwen3vl_kernels.varlen_attention import varlen_attention_bounded

    return varlen_attention_bounded(q, k, v, meta.cu_seqlens_t, meta.max_query_len, scale, causal=True)


def varlen_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int],
                           scale: float) -> torch.Tensor:
    """Bidirectional attention within each segment of a packed batch (the ViT's frames). One
    segment (an image): SDPA's own output, laid out as its kernel leaves it (cuDNN's as q), not
    copied into another tensor."""
    if len(cu_seqlens) == 2 and cu_seqlens[0] == 0 and cu_seqlens[1] == q.shape[0]:
        return _sdpa(q, k, v, scale=scale)
    out = torch.empty_like(q)
    for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        out[a:b] = _sdpa(q[a:b], k[a:b], v[a:b], scale=scale)
    return out


def _sdpa(q, k, v, **kw) -> torch.Tensor:
    """(L, H, D) tensors through SDPA with a batch dimension: 3-D inputs can miss the fused
    flash / memory-efficient kernels and fall back to materialising the score matrix."""
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], **kw)
    return o[0].transpose(0, 1)
