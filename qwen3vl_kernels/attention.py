"""Paged decode attention: one query token per sequence against its KV blocks.

One program per (sequence, KV head, split) handles that head's whole query group at once (GQA:
the group's rows share every K/V load), streaming over its share of the sequence's cache pages
with an online softmax, several pages per tile. The group is padded to 16 rows, the smallest
tile `tl.dot` takes. With few sequences the context is split so the GPU has enough programs
(flash-decoding): each split leaves its running max, normaliser and unnormalised output, and a
second launch merges them. (Merging in the split that finishes last, as a multi-block decode
does, was slower at every split count: NOTES, twelfth session.) The split count depends only on
the batch shape, so the launch is the same on every replay of a CUDA graph; each split finds its
pages from the context length.
Cache layout per layer: (2, num_blocks, block_size, Hkv, D), K then V, in q's dtype or float8 e4m3
(`--kv-cache-dtype fp8_e4m3`: each tile widened as it loads, to float16 for bf16 queries: F16_DOT).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import triton
import triton.language as tl

from . import switches
from .pdl import gdc_enter, gdc_launch, gdc_wait, pdl
from .tables import device_file, device_table

from .online_softmax import online_softmax_step

TARGET_PROGRAMS = 128      # about one wave on an H100/H200 (132 SMs)
MAX_SPLITS = 32
# launch shape: pages per tile, warps, pipeline stages, and the programs the split count aims at
DEFAULT_CONFIG = {"PAGES_TOKENS": 64, "num_warps": 4, "num_stages": 2, "target_programs": TARGET_PROGRAMS}


@triton.jit
def _norm_rotary(src, w_ptr, cos_row, sin_row, mask, eps, HEAD_DIM: tl.constexpr):
    """qkv_prep_'s math for rows of heads (`src`: each row's first element, (R, 1)): per-head
    RMSNorm (float32 statistics, the weight applied after the cast back) and rotate-half rotary
    (float32), in the input's dtype. cos/sin rows have equal halves; the first is read."""
    HALF: tl.constexpr = HEAD_DIM // 2
    dims = tl.arange(0, HEAD_DIM)[None, :]
    partner = (dims + HALF) % HEAD_DIM
    x = tl.load(src + dims, mask=mask, other=0.0)
    xp = tl.load(src + partner, mask=mask, other=0.0)
    f, fp = x.to(tl.float32), xp.to(tl.float32)
    rstd = (1.0 / tl.sqrt(tl.sum(f * f, 1) / HEAD_DIM + eps))[:, None]
    y = ((f * rstd).to(x.dtype) * tl.load(w_ptr + dims)).to(x.dtype).to(tl.float32)
    yp = ((fp * rstd).to(x.dtype) * tl.load(w_ptr + partner)).to(x.dtype).to(tl.float32)
    c = tl.load(cos_row + dims % HALF)
    s = tl.load(sin_row + dims % HALF)
    return (y * c + tl.where(dims < HALF, -1.0, 1.0) * yp * s).to(x.dtype)


@triton.jit
def _widen(x, q_ptr, F16_DOT: tl.constexpr):
    """A loaded tile (q, or the cache's K/V) in the dots' dtype: float16 (F16_DOT), else q's."""
    if F16_DOT:
        out = x.to(tl.float16)
    else:
        out = x.to(q_ptr.dtype.element_ty)
    return out


@triton.jit
def _paged_decode_kernel(
    # pointers
    q_ptr, cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, m_ptr, l_ptr,
    # scalars
    scale, GROUP, num_heads,
    # strides
    stride_qt, stride_qh, stride_ckv, stride_cb, stride_cs, stride_ch, stride_bt, stride_ot, stride_oh,
    # meta
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, PAGES: tl.constexpr, GROUP_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr, USE_PDL: tl.constexpr = False, PREFETCH: tl.constexpr = False,
    qw_ptr=None, kw_ptr=None, cos_ptr=None, sin_ptr=None, slot_ptr=None, eps=0.0, stride_ct=0,
    PREP: tl.constexpr = False, F16_DOT: tl.constexpr = False,
):
    """PREFETCH (a decode step, with PDL): the context lengths, block tables and the split's first
    tile of K/V are read before the wait for the kernel before, which writes only each sequence's
    newest position (ctx - 1: the step's own token); that row is read after the wait.
    PREP (`paged_decode_attention_prep`): q_ptr is the qkv projection's output, and the kernel does
    qkv_prep_'s work itself: q's and the newest k's per-head RMSNorm and rotary, the newest k and
    v used in place of the cache's row and written to the cache by the split that holds it.
    F16_DOT (a float8 cache, bf16 queries): q, K, V and the probabilities meet in float16 dots.
    e4m3 widens to float16 in one instruction for two values (to bfloat16 it took three an
    element: 30B fp8 c128's step 9.1% slower than a bf16 cache's), and float16 holds q's and the
    probabilities' bf16 values exactly at their sizes here (|q| far below 65504)."""
    if PREFETCH:
        gdc_launch(USE_PDL)
    else:
        gdc_enter(USE_PDL)
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + seq)
    n_pages = tl.cdiv(ctx, BLOCK_SIZE)
    per_split = tl.cdiv(n_pages, NUM_SPLITS)
    first = split * per_split
    last = tl.minimum(first + per_split, n_pages)

    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + rows
    row_ok = rows < GROUP
    tile = tl.arange(0, PAGES * BLOCK_SIZE)
    page_of, slot_of = tile // BLOCK_SIZE, tile % BLOCK_SIZE
    newest_page = (ctx - 1) // BLOCK_SIZE
    if PREFETCH:
        page = first + page_of
        live0 = (page < last) & (page * BLOCK_SIZE + slot_of < ctx)
        phys = tl.load(block_tables_ptr + seq * stride_bt + page, mask=page < last, other=0).to(tl.int64)
        base0 = cache_ptr + phys[:, None] * stride_cb + slot_of[:, None] * stride_cs + kvh * stride_ch + dims[None, :]
        old = live0 & (page * BLOCK_SIZE + slot_of < ctx - 1)
        k0 = _widen(tl.load(base0, mask=old[:, None], other=0.0), q_ptr, F16_DOT)
        v0 = _widen(tl.load(base0 + stride_ckv, mask=old[:, None], other=0.0), q_ptr, F16_DOT)
        if not PREP:    # the newest row's place (the block table is the step's input, not the kernel before's)
            newest = (cache_ptr + tl.load(block_tables_ptr + seq * stride_bt + newest_page).to(tl.int64) * stride_cb
                      + ((ctx - 1) % BLOCK_SIZE) * stride_cs + kvh * stride_ch + dims)
        gdc_wait(USE_PDL)
    if PREP:
        row = q_ptr + seq * stride_qt
        cos_row, sin_row = cos_ptr + seq * stride_ct, sin_ptr + seq * stride_ct
        q = _norm_rotary(row + heads[:, None] * HEAD_DIM, qw_ptr, cos_row, sin_row, row_ok[:, None], eps, HEAD_DIM)
        k_new = _norm_rotary(row + (num_heads + kvh) * HEAD_DIM + tl.zeros((1, 1), tl.int32), kw_ptr, cos_row,
                             sin_row, tl.full((1, 1), True, tl.int1), eps, HEAD_DIM)
        v_new = tl.load(row + (num_heads + tl.num_programs(1) + kvh) * HEAD_DIM + dims[None, :])
        if (first <= newest_page) & (newest_page < last):         # the split that holds the newest row
            dst = cache_ptr + tl.load(slot_ptr + seq).to(tl.int64) * stride_cs + kvh * stride_ch + dims[None, :]
            tl.store(dst, k_new)
            tl.store(dst + stride_ckv, v_new)
    else:
        q = _widen(tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + dims[None, :], mask=row_ok[:, None],
                           other=0.0), q_ptr, F16_DOT)
    if PREFETCH:
        new = live0 & (page * BLOCK_SIZE + slot_of == ctx - 1)
        if PREP:
            k0 = tl.where(new[:, None], k_new, k0)
            v0 = tl.where(new[:, None], v_new, v0)
        else:           # one row's load, not a masked tile's
            k0 = tl.where(new[:, None], tl.load(newest).to(k0.dtype)[None, :], k0)
            v0 = tl.where(new[:, None], tl.load(newest + stride_ckv).to(v0.dtype)[None, :], v0)
    m_i = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), tl.float32)
    start = first
    if PREFETCH:
        if first < last:                # a split with no pages folds in nothing (an all-masked tile is NaN)
            m_i, l_i, acc = online_softmax_step(q, k0, v0, live0[None, :], scale, m_i, l_i, acc)
        start = first + PAGES
    for p0 in range(start, last, PAGES):
        page = p0 + page_of
        live = (page < last) & (page * BLOCK_SIZE + slot_of < ctx)
        phys = tl.load(block_tables_ptr + seq * stride_bt + page, mask=page < last, other=0).to(tl.int64)
        base = cache_ptr + phys[:, None] * stride_cb + slot_of[:, None] * stride_cs + kvh * stride_ch + dims[None, :]
        if PREP:        # the newest row from registers: the cache's is this launch's own write
            new = live & (page * BLOCK_SIZE + slot_of == ctx - 1)
            k = tl.where(new[:, None], k_new, tl.load(base, mask=(live & ~new)[:, None], other=0.0))
            v = tl.where(new[:, None], v_new, tl.load(base + stride_ckv, mask=(live & ~new)[:, None], other=0.0))
        else:
            k = _widen(tl.load(base, mask=live[:, None], other=0.0), q_ptr, F16_DOT)
            v = _widen(tl.load(base + stride_ckv, mask=live[:, None], other=0.0), q_ptr, F16_DOT)
        m_i, l_i, acc = online_softmax_step(q, k, v, live[None, :], scale, m_i, l_i, acc)
    if NUM_SPLITS == 1:
        tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + dims[None, :],
                 (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:   # partials, float32: (S, H, NUM_SPLITS) for m and l, (S, H, NUM_SPLITS, D) for acc
        part = (seq * num_heads + heads) * NUM_SPLITS + split
        tl.store(m_ptr + part, m_i, mask=row_ok)
        tl.store(l_ptr + part, l_i, mask=row_ok)
        tl.store(out_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _merge_splits_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, num_heads, stride_ot, stride_oh,
                         HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, USE_PDL: tl.constexpr = False):
    gdc_enter(USE_PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, HEAD_DIM)
    base = (seq * num_heads + head) * NUM_SPLITS
    m = tl.load(m_ptr + base + splits)
    l = tl.load(l_ptr + base + splits)
    w = tl.exp(m - tl.max(m, 0))                 # empty splits: m = -inf, weight 0
    acc = tl.load(acc_ptr + (base + splits)[:, None] * HEAD_DIM + dims[None, :])
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


def num_splits_for(num_seqs: int, kv_heads: int, target: int = TARGET_PROGRAMS) -> int:
    """The largest power of two that keeps (sequences x KV heads x splits) within `target` programs."""
    n = target // max(1, num_seqs * kv_heads)
    return 1 if n < 2 else min(MAX_SPLITS, 1 << (n.bit_length() - 1))


def config_file(device_name: str) -> Path:
    return device_file("paged_decode", device_name)


@functools.lru_cache(maxsize=None)        # read on every launch outside a graph: resolved once
def _table(device_name: str) -> dict[int | str, dict]:
    """{sequences, or "sequences,KV heads,group": launch shape} (`benchmarks.kernels --only
    decodeattn --write-configs`), or {}."""
    return device_table(config_file, device_name) or {}


def decode_config(num_seqs: int, device: torch.device, kv_heads: int | None = None, group: int | None = None,
                  fp8_cache: bool = False) -> dict:
    """This device's launch shape for the batch (`pick_config`)."""
    table = _table(torch.cuda.get_device_name(device)) if device.type == "cuda" else {}
    return pick_config(table, num_seqs, kv_heads, group, fp8_cache)


def pick_config(table: dict, num_seqs: int, kv_heads: int | None, group: int | None, fp8_cache: bool = False) -> dict:
    """An entry for exactly this (sequences, KV heads, query group), else the one at the nearest
    tuned batch size (the launch depends only on the batch and the heads: a CUDA graph's launch
    is fixed), else the default; over the default's keys. With a float8 cache, the table's "fp8"
    entry under the same key, where there is one, goes over it: the H200's at 128 sequences
    (128-token tiles: 30B fp8's step 14.45 -> 13.56 ms, the bf16 cache's 13.64; doubling the
    tiles at 1, 16 and 64 sequences lost: NOTES, forty-third session; three stages: 13.45 -> 13.27
    ms, forty-fourth), at 16 (32-token tiles: 7.288 -> 7.172 ms, forty-fourth) and at one sequence
    of 30B's heads (32-token tiles at 32 splits: 30B fp8's step 1.921 -> 1.898 ms, bf16's 2.341 ->
    2.320; over a bf16 cache 1.892 -> 1.888, so not there: forty-fifth)."""
    over = table.get("fp8", {}) if fp8_cache else {}
    key = f"{num_seqs},{kv_heads},{group}"
    if key not in table:
        by_batch = [k for k in table if isinstance(k, int)]
        if not by_batch:
            return {**DEFAULT_CONFIG, **over.get(str(num_seqs), {})}
        key = min(by_batch, key=lambda k: abs(k - num_seqs))
    return {**DEFAULT_CONFIG, **table[key], **over.get(str(key), {})}


def paged_decode_attention_prep(qkv: torch.Tensor, n_q: int, n_kv: int, q_weight: torch.Tensor,
                                k_weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                                cache: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                                context_lens: torch.Tensor, scale: float, **launch) -> torch.Tensor:
    """qwen3vl_kernels.rope.qkv_prep_ and paged_decode_attention in one launch, for a decode step (one token
    a sequence, its slot the position context_lens - 1): qkv (S, (Hq + 2 Hkv) * D) as the fused
    projection leaves it (unchanged here); the newest k and v are written to the cache (2, NB, BS,
    Hkv, D, contiguous) in the same launch that reads it, so no sequence may read another's newest
    slot (the block manager's blocks: a sequence writes only into its own last block, and a shared
    prefix block is full). -> attention's output (S, Hq, D). `launch`: paged_decode_attention's."""
    t = qkv.shape[0]
    d = cache.shape[-1]
    if (qkv.shape[1] != (n_q + 2 * n_kv) * d or qkv.stride(1) != 1 or cache.shape[-2] != n_kv
            or not cache.is_contiguous() or cos.shape != (t, d) or sin.stride() != cos.stride() or d & (d - 1)
            or slot_mapping.shape != (t,)):
        raise ValueError(f"paged_decode_attention_prep: qkv {tuple(qkv.shape)}, heads {n_q}/{n_kv}, cache "
                         f"{tuple(cache.shape)}, cos {tuple(cos.shape)}, slots {tuple(slot_mapping.shape)}")
    q = qkv[:, : n_q * d].view(t, n_q, d)
    return paged_decode_attention(q, cache, block_tables, context_lens, scale,
                                  prep=(q_weight, k_weight, eps, cos, sin, slot_mapping), **launch)


def paged_decode_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, out: torch.Tensor | None = None,
                           num_splits: int | None = None, config: dict | None = None,
                           prefetch: bool | None = None, prep: tuple | None = None) -> torch.Tensor:
    """q (S, H, D), cache (2, NB, BS, Hkv, D), block_tables (S, max_blocks) int32, context_lens (S,) int32.
    `config`: the launch shape (decode_config's keys; an entry's "merge_warps", 4 without it, is
    the merge launch's; its "maxnreg", where set, caps the kernel's registers a thread: ptxas
    spills past it), else this device's table. `prefetch`: the
    kernel before wrote only each sequence's newest K/V (a decode step's q/k prep), so the rest may
    be read before waiting for it (the kernel's PREFETCH; default qwen3vl_kernels.switches.PDL_PREFETCH for
    batches of at most qwen3vl_kernels.switches.PREFETCH_MAX_SEQS sequences).
    `prep`: paged_decode_attention_prep's (q a view of qkv)."""
    s, h, d = q.shape
    _, _, bs, hkv, d2 = cache.shape
    if d2 != d or h % hkv or block_tables.shape[0] != s or context_lens.shape[0] != s:
        raise ValueError(f"paged_decode_attention shapes disagree: q {tuple(q.shape)}, cache {tuple(cache.shape)}, "
                         f"block_tables {tuple(block_tables.shape)}, context_lens {tuple(context_lens.shape)}")
    if bs < 16 or bs & (bs - 1):
        raise ValueError(f"paged_decode_attention: block size {bs}: needs a power of two >= 16 (tl.dot tiles)")
    if q.stride(-1) != 1 or cache.stride(-1) != 1:
        raise ValueError("paged_decode_attention needs the head dim contiguous")
    if cache.dtype not in (q.dtype, torch.float8_e4m3fn) or (prep is not None and cache.dtype != q.dtype):
        raise ValueError(f"paged_decode_attention: a {cache.dtype} cache for {q.dtype} queries (q's dtype, or "
                         "float8_e4m3fn without the prep inside)")
    group = h // hkv
    out = torch.empty(s, h, d, dtype=q.dtype, device=q.device) if out is None else out
    cfg = {**DEFAULT_CONFIG, **config} if config else decode_config(s, q.device, hkv, group,
                                                                     cache.dtype == torch.float8_e4m3fn)
    splits = num_splits or num_splits_for(s, hkv, cfg["target_programs"])
    if splits & (splits - 1):
        raise ValueError(f"paged_decode_attention: num_splits {splits} must be a power of two")
    if splits > 1:
        acc = torch.empty(s, h, splits, d, dtype=torch.float32, device=q.device)
        m = torch.empty(s, h, splits, dtype=torch.float32, device=q.device)
        l_ = torch.empty_like(m)
    else:
        acc, m, l_ = out, out, out
    _paged_decode_kernel[(s, hkv, splits)](
        q, cache, block_tables, context_lens, acc, m, l_,
        scale, group, h,
        q.stride(0), q.stride(1), cache.stride(0), cache.stride(1), cache.stride(2), cache.stride(3),
        block_tables.stride(0), out.stride(0), out.stride(1),
        HEAD_DIM=d, BLOCK_SIZE=bs, PAGES=max(1, cfg["PAGES_TOKENS"] // bs),
        GROUP_PAD=max(16, triton.next_power_of_2(group)), NUM_SPLITS=splits, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], F16_DOT=cache.dtype == torch.float8_e4m3fn and q.dtype == torch.bfloat16,
        **({"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") else {}),
        PREFETCH=(switches.PDL_PREFETCH and s <= switches.PREFETCH_MAX_SEQS) if prefetch is None else prefetch,
        **(dict(zip(("qw_ptr", "kw_ptr", "eps", "cos_ptr", "sin_ptr", "slot_ptr"), prep), stride_ct=prep[3].stride(0),
                    PREP=True) if prep is not None else {}), **pdl(q),
    )
    if splits > 1:
        _merge_splits_kernel[(s, h)](acc, m, l_, out, h, out.stride(0), out.stride(1), HEAD_DIM=d, NUM_SPLITS=splits,
                                   num_warps=cfg.get("merge_warps", 4), **pdl(q))
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
