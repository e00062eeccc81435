"""Fused MoE: route -> align tokens per expert -> grouped GEMM (gate_up) -> SiLU*mul -> grouped GEMM (down,
routing weight applied) -> combine over the top-k.

Shapes: M = tokens, H = hidden, I = expert intermediate, E = experts, A = experts per token.
w13 (E, 2I, H) and w2 (E, H, I) in linear layout. The (M*A) token-expert pairs are sorted by
expert and each expert's run is padded to BLOCK_M, so every program of the grouped GEMM works on
one expert's weight tile; padding rows carry the sentinel M*A and are neither read nor written.
Launch configs come from JSON tables keyed by (E, N, K, device), looked up at the nearest M;
nothing is autotuned on the request path.

Small batches (decode) take a second path with no sort at all: while M*A pairs are few, reading
an expert once per pair costs less than aligning, and each pair is a GEMV: gate_up with SiLU*mul
fused (one program per pair and column block), then down with the routing weights and the
top-k combine fused (one program per token and column block, its top-k experts side by side).
`route` is the matching router: softmax, top-k and renormalisation in one launch; `norm_route`
also does the RMSNorm before it and the router's GEMV, for one token (batch-1 decode).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

from . import gluon_dense, switches
from .pdl import gdc_enter, gdc_launch, gdc_wait, pdl
from .tables import device_file, device_table

from .fp8 import E4M3_BITS_SCALE, _e4m3_bf16_bits, _e4m3_bits_as_f32, group_scale_ok, quantize_activations_fp8
from .linear import block_scaled, dividing

log = logging.getLogger(__name__)
DEFAULT_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}


@triton.jit
def _dot(a, b, SWAP_AB: tl.constexpr):
    """a @ b. SWAP_AB: computed as (b^T a^T)^T, so that b's columns (the weight rows) are the
    tensor-core instruction's M, which on sm_90 is 64 a warpgroup, and a's few rows (a decode
    batch's) its N, which may be as small as 8: a 16-row tile then runs wgmma, not mma.sync, and
    an fp8 one multiplies as fp8. The transpose of the result only renames its registers."""
    if SWAP_AB:
        out = tl.trans(tl.dot(tl.trans(b), tl.trans(a)))
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _bits_dot(a, b, ASM: tl.constexpr, SWAP_AB: tl.constexpr = False):
    """a (bfloat16) times the e4m3 tile b made wider by integer ops: the product times 2^-120.
    With ASM a bfloat16 dot (fp8._e4m3_bf16_bits); off the GPU, where the interpreter mishandles
    bfloat16 subnormals and bfloat16 dots, a float32 one (fp8._e4m3_bits_as_f32 on each byte: the
    same products exactly)."""
    if ASM:
        out = _dot(a, _e4m3_bf16_bits(b), SWAP_AB)
    else:
        out = _dot(a.to(tl.float32), _e4m3_bits_as_f32(b.to(tl.uint8, bitcast=True).to(tl.int32), 0), SWAP_AB)
    return out


# L2_PREFETCH's PTX: ask L2 for the 128-byte line at an address. A hint: nothing comes back, and
# the loads after it find the line there or on its way.
_L2_PREFETCH = tl.constexpr("prefetch.global.L2 [$1];\n mov.b32 $0, 0;")


@triton.jit
def _l2_prefetch_lines(base, rows, stride_bytes, start_bytes, end_bytes, LINES: tl.constexpr, ASM: tl.constexpr):
    """Every 128-byte line of bytes [start_bytes, end_bytes) of the rows `rows` (stride_bytes apart
    from the int8 pointer `base`) asked of L2 at once; lines past the end ask for the row's first.
    On the GPU (ASM) only: the interpreter runs no PTX, and the answer is the same without it."""
    if ASM:
        offs = start_bytes + tl.arange(0, LINES) * 128
        offs = tl.where(offs < end_bytes, offs, 0)            # (a split past K's end: none of its own)
        ptrs = base + rows[:, None].to(tl.int64) * stride_bytes + offs[None, :]
        tl.inline_asm_elementwise(_L2_PREFETCH, "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _k_steps(a_ptrs, b_ptrs, s_ptrs, s_up_ptrs, as_ptrs, valid, k_first, steps, N, K, stride_ak, stride_bk, stride_bn,
             FUSE_SILU: tl.constexpr, SCALE_MODE: tl.constexpr, A_SCALED: tl.constexpr, BITS: tl.constexpr,
             ASM: tl.constexpr, SWAP_AB: tl.constexpr, SCALES_AHEAD: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BK: tl.constexpr):
    """The grouped GEMM's K steps k_first .. steps - 1 of one output tile -> (acc, acc_up), float32
    (acc_up: FUSE_SILU's up columns, N rows of b below the gate's). a_ptrs / b_ptrs point at the
    first step's tiles; s_ptrs / s_up_ptrs at the tile's weight scales (SCALE_MODE 1: a column's,
    2: the tile's) and as_ptrs at its rows' activation scales (A_SCALED), each a K block apart.
    SCALES_AHEAD (SCALE_MODE 2): a step's scales are loaded one step before it (the first before
    the loop), so no step's products wait on a load issued after them; without it, in the step.
    On an H200 the W8A8 prefill GEMMs' warps stalled most on global loads, these among them: ahead,
    gate_up's load stalls fell from ~2.0 to ~1.6 a instruction (NOTES, thirty-third session)."""
    AHEAD: tl.constexpr = 1 if SCALES_AHEAD else 0
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SCALE_MODE == 2:
        kb = (k_first * BLOCK_K) // BK
        s_now = tl.load(s_ptrs + kb)
        s_up_now = tl.load(s_up_ptrs + kb) if FUSE_SILU else s_now
        sa_now = tl.load(as_ptrs + kb, mask=valid, other=0.0) if A_SCALED else s_now
    for k in range(k_first, steps):
        k_left = K - k * BLOCK_K
        kb = (k * BLOCK_K) // BK
        if SCALE_MODE == 2:
            kb_load = tl.minimum(((k + AHEAD) * BLOCK_K) // BK, (K - 1) // BK)    # past the last: its own
            s_next = tl.load(s_ptrs + kb_load)
            s_up_next = tl.load(s_up_ptrs + kb_load) if FUSE_SILU else s_next
            sa_next = tl.load(as_ptrs + kb_load, mask=valid, other=0.0) if A_SCALED else s_next
            if not SCALES_AHEAD:
                s_now, s_up_now, sa_now = s_next, s_up_next, sa_next
        a = tl.load(a_ptrs, mask=valid[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if FUSE_SILU:
            b_up = tl.load(b_ptrs + N * stride_bn, mask=offs_k[:, None] < k_left, other=0.0)
        if SCALE_MODE == 0:
            acc += _dot(a, b, SWAP_AB)
            if FUSE_SILU:
                acc_up += _dot(a, b_up, SWAP_AB)
        elif SCALE_MODE == 1:
            acc += _dot(a, (b.to(tl.float32) * tl.load(s_ptrs + kb)[None, :]).to(a.dtype), SWAP_AB)
            if FUSE_SILU:
                acc_up += _dot(a, (b_up.to(tl.float32) * tl.load(s_up_ptrs + kb)[None, :]).to(a.dtype), SWAP_AB)
        else:
            if A_SCALED:
                acc += _dot(a, b, SWAP_AB) * (sa_now[:, None] * s_now)
                if FUSE_SILU:
                    acc_up += _dot(a, b_up, SWAP_AB) * (sa_now[:, None] * s_up_now)
            elif BITS:
                acc += _bits_dot(a, b, ASM, SWAP_AB) * (s_now * E4M3_BITS_SCALE) * E4M3_BITS_SCALE
                if FUSE_SILU:
                    acc_up += _bits_dot(a, b_up, ASM, SWAP_AB) * (s_up_now * E4M3_BITS_SCALE) * E4M3_BITS_SCALE
            else:
                acc += _dot(a, b.to(a.dtype), SWAP_AB) * s_now
                if FUSE_SILU:
                    acc_up += _dot(a, b_up.to(a.dtype), SWAP_AB) * s_up_now
            s_now, s_up_now, sa_now = s_next, s_up_next, sa_next
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc, acc_up


@triton.jit
def _silu_and_weight(acc, acc_up, w_early, weights_ptr, pair, valid, FUSE_SILU: tl.constexpr,
                     MUL_WEIGHT: tl.constexpr, WEIGHTS_EARLY: tl.constexpr):
    """The grouped GEMM's tile before its store: FUSE_SILU's SiLU(gate) * up, then MUL_WEIGHT's
    routing weight a row (`w_early`, loaded before the K steps with WEIGHTS_EARLY, else here)."""
    if FUSE_SILU:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    if MUL_WEIGHT:
        if WEIGHTS_EARLY:
            w = w_early
        else:
            w = tl.load(weights_ptr + pair, mask=valid, other=0.0)
        acc = acc * w[:, None]
    return acc


@triton.jit
def _grouped_gemm_kernel(
    # pointers
    a_ptr, b_ptr, c_ptr, weights_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr, s_ptr,
    # sizes (num_experts: blocks of expert id num_experts, the expert-parallel sentinel, are skipped)
    N, K, num_valid, top_k, num_experts,
    # strides
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn, stride_se, stride_sn,
    # meta
    A_ROWS_ARE_PAIRS: tl.constexpr, MUL_WEIGHT: tl.constexpr, FUSE_SILU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SCALE_MODE: tl.constexpr = 0, BN: tl.constexpr = 128, BK: tl.constexpr = 128,
    as_ptr=None, stride_asm=0, A_SCALED: tl.constexpr = False, USE_PDL: tl.constexpr = False,
    PAIR_BLOCKS: tl.constexpr = False, DENSE: tl.constexpr = False, SPLIT_K: tl.constexpr = 1,
    ws_ptr=None, count_ptr=None, BITS: tl.constexpr = False, ASM: tl.constexpr = False,
    L2_PREFETCH: tl.constexpr = False, LINES: tl.constexpr = 1, SWAP_AB: tl.constexpr = False,
    SCALES_AHEAD: tl.constexpr = True, WEIGHTS_EARLY: tl.constexpr = False,
):
    """SCALE_MODE 0: bf16 weights. fp8 weights in BN x BK blocks: 1, each column's scale applied to
    the weight tile in registers (any tile); 2, the tile lies in one block (BLOCK_N | BN, BLOCK_K |
    BK), so one scale multiplies the tile's product. A_SCALED (with 2): a is fp8 too, with a
    float32 scale per row and BK group (`as_ptr`), and the product is an fp8 tl.dot (W8A8).
    PAIR_BLOCKS (one token, whose top-k experts are distinct): block j is pair j alone and
    `expert_ids_ptr` the token's ids, so no sorting launch comes first (sorted_ids_ptr and
    num_padded_ptr are not read). DENSE: one expert (b's only one) and the rows in order, a dense
    layer's GEMM (`dense_fp8_gemm`): no id is read, and the last block's rows past num_valid are
    padding. SPLIT_K (DENSE): program_id(1) takes that share of the K steps and stores its float32
    partial tile in `ws_ptr` (SPLIT_K, num_valid, N); the program that finishes a tile last (an
    atomic count per tile, reset by it) sums the partials in split order, so the answer does not
    depend on which finished first. BITS (SCALE_MODE 2, a bfloat16, not A_SCALED): the weight
    tiles become bfloat16 by integer ops (qwen3vl_kernels.fp8._e4m3_bf16_bits; ASM: its PTX, on the GPU),
    2^-120 of their values, made up in the scale. L2_PREFETCH (DENSE, ASM): before PDL's wait the
    program asks L2 for its weight tile's lines over its K steps (LINES: a row's, a power of two),
    which no kernel writes, while the kernel before it still runs. SWAP_AB: every dot as (b^T a^T)^T
    (_dot), the weight tile's BLOCK_N rows the tensor cores' M side (wgmma from 64 on sm_90).
    SCALES_AHEAD: _k_steps'. WEIGHTS_EARLY (MUL_WEIGHT): the rows' routing weights are loaded
    before the K steps, not after them. (Weight tiles through a TMA tensor descriptor were measured
    within 0.4% of these loads at 16 and 64 rows on an H200 and removed: NOTES, twenty-sixth and
    twenty-ninth sessions. W8A16 tiles scaled before their dots and accumulated in place were
    slower than these launches at 16 and 64 rows, dense and MoE, and removed: thirty-fourth.)"""
    tl.static_assert(DENSE or not L2_PREFETCH, "L2_PREFETCH: dense launches only (the rest read ids first)")
    gdc_launch(USE_PDL)
    if not L2_PREFETCH:
        gdc_wait(USE_PDL)
    pid = tl.program_id(0)
    if PAIR_BLOCKS:
        num_padded = num_valid * BLOCK_M
    elif DENSE:
        num_padded = num_valid
    else:
        num_padded = tl.load(num_padded_ptr)
    grid_m = tl.cdiv(num_padded, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    if pid >= grid_m * grid_n:
        return
    pid_m, pid_n = _grouped_tile(pid, grid_m, GROUP_M * grid_n, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if PAIR_BLOCKS:
        pair = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, num_valid)
    elif DENSE:
        pair = tl.where(offs_m < num_valid, offs_m, num_valid)
    else:
        pair = tl.load(sorted_ids_ptr + offs_m)              # token * top_k + slot, or num_valid
    valid = pair < num_valid
    a_row = pair if A_ROWS_ARE_PAIRS else pair // top_k
    if DENSE:
        expert = (pid_m * 0).to(tl.int64)                    # the one expert, 0
    else:
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if expert >= num_experts:
        return

    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    steps = tl.cdiv(K, BLOCK_K)
    k_first = 0
    if SPLIT_K > 1:
        k_first = tl.program_id(1) * tl.cdiv(steps, SPLIT_K)
        steps = tl.minimum(steps, k_first + tl.cdiv(steps, SPLIT_K))
    if L2_PREFETCH:
        elt = b_ptr.dtype.element_ty.primitive_bitwidth // 8
        _l2_prefetch_lines(b_ptr.to(tl.pointer_type(tl.int8)), offs_n, stride_bn * elt, k_first * BLOCK_K * elt,
                           tl.minimum(steps * BLOCK_K, K) * elt, LINES, ASM)
        gdc_wait(USE_PDL)
    offs_k = k_first * BLOCK_K + tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_row[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
    if SCALE_MODE == 1:
        s_ptrs = s_ptr + expert * stride_se + (offs_n // BN) * stride_sn
        s_up_ptrs = s_ptr + expert * stride_se + ((offs_n + N) // BN) * stride_sn
    else:
        s_ptrs = s_ptr + expert * stride_se + ((pid_n * BLOCK_N) // BN) * stride_sn
        s_up_ptrs = s_ptr + expert * stride_se + ((pid_n * BLOCK_N + N) // BN) * stride_sn
    w_early = None
    if MUL_WEIGHT and WEIGHTS_EARLY:
        w_early = tl.load(weights_ptr + pair, mask=valid, other=0.0)
    acc, acc_up = _k_steps(a_ptrs, b_ptrs, s_ptrs, s_up_ptrs, as_ptr + a_row.to(tl.int64) * stride_asm, valid,
                           k_first, steps, N, K, stride_ak, stride_bk, stride_bn, FUSE_SILU, SCALE_MODE, A_SCALED,
                           BITS, ASM, SWAP_AB, SCALES_AHEAD, BLOCK_M, BLOCK_N, BLOCK_K, BK)
    acc = _silu_and_weight(acc, acc_up, w_early, weights_ptr, pair, valid, FUSE_SILU, MUL_WEIGHT, WEIGHTS_EARLY)
    out_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + pair[:, None].to(tl.int64) * stride_cm + out_n[None, :] * stride_cn
    c_mask = valid[:, None] & (out_n[None, :] < N)
    if SPLIT_K > 1:
        part = pair[:, None].to(tl.int64) * N + out_n[None, :]
        tl.store(ws_ptr + tl.program_id(1) * num_valid * N + part, acc, mask=c_mask)
        tl.debug_barrier()              # every thread's partial stored before the count releases it
        if tl.atomic_add(count_ptr + pid, 1, sem="acq_rel") == SPLIT_K - 1:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for split in range(0, SPLIT_K):
                acc += tl.load(ws_ptr + split * num_valid * N + part, mask=c_mask, other=0.0, volatile=True)
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)
            tl.atomic_xchg(count_ptr + pid, 0)
    else:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _grouped_tile(tile, grid_m, per_group, GROUP_M: tl.constexpr):
    """Output tile `tile` -> (block of rows, block of columns) in the grouped order: GROUP_M row
    blocks down each column block in turn, so that neighbouring tiles share weight tiles in L2."""
    first_m = (tile // per_group) * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % size_m, (tile % per_group) // size_m


@triton.jit
def _grouped_gemm_persistent_kernel(
    a_ptr, b_ptr, c_ptr, weights_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr, s_ptr, as_ptr,
    N, K, num_valid, top_k,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn, stride_se, stride_sn, stride_asm,
    A_ROWS_ARE_PAIRS: tl.constexpr, MUL_WEIGHT: tl.constexpr, FUSE_SILU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SCALED: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, A_SCALED: tl.constexpr,
    USE_PDL: tl.constexpr = False, SCALES_AHEAD: tl.constexpr = True, WEIGHTS_EARLY: tl.constexpr = False,
):
    """_grouped_gemm_kernel's sorted path (SCALE_MODE 0, or 2 with SCALED, W8A8 with A_SCALED) as a
    persistent launch: each program takes the output tiles pid, pid + programs, ... up to the
    padded total's, in the same grouped order: no program starts past the total, and a program's
    next tile starts as its last ends, with no launch between. Every block's expert is one of b's
    (no expert-parallel sentinel). Measured and removed (NOTES, thirty-third session): the tiles'
    K steps as one software-pipelined loop (tl.range's flatten), and L2 asked for the next tile's
    first weight K steps as a tile starts. WEIGHTS_EARLY: _grouped_gemm_kernel's."""
    gdc_launch(USE_PDL)
    gdc_wait(USE_PDL)
    num_padded = tl.load(num_padded_ptr)
    grid_m = tl.cdiv(num_padded, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    steps = tl.cdiv(K, BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)
    tiles = grid_m * grid_n
    for tile in range(tl.program_id(0), tiles, tl.num_programs(0)):
        pid_m, pid_n = _grouped_tile(tile, grid_m, per_group, GROUP_M)
        pair = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = pair < num_valid
        a_row = pair if A_ROWS_ARE_PAIRS else pair // top_k
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
        a_ptrs = a_ptr + a_row[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None] * stride_bk
        s_ptrs = s_ptr + expert * stride_se + ((pid_n * BLOCK_N) // BN) * stride_sn
        s_up_ptrs = s_ptr + expert * stride_se + ((pid_n * BLOCK_N + N) // BN) * stride_sn
        w_early = None
        if MUL_WEIGHT and WEIGHTS_EARLY:
            w_early = tl.load(weights_ptr + pair, mask=valid, other=0.0)
        acc, acc_up = _k_steps(a_ptrs, b_ptrs, s_ptrs, s_up_ptrs, as_ptr + a_row.to(tl.int64) * stride_asm, valid,
                               0, steps, N, K, stride_ak, stride_bk, stride_bn, FUSE_SILU, 2 if SCALED else 0,
                               A_SCALED, False, False, False, SCALES_AHEAD, BLOCK_M, BLOCK_N, BLOCK_K, BK)
        acc = _silu_and_weight(acc, acc_up, w_early, weights_ptr, pair, valid, FUSE_SILU, MUL_WEIGHT, WEIGHTS_EARLY)
        out_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        tl.store(c_ptr + pair[:, None].to(tl.int64) * stride_cm + out_n[None, :] * stride_cn,
                 acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & (out_n[None, :] < N))


@triton.jit
def _expert_run(counts, e, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr):
    """From every expert's pair count (E_PAD,): expert e's first row in the sorted order (the
    experts before it, each padded to BLOCK_M rows), its pair count and its padded rows, and
    every expert's padded rows (their sum is the padded total)."""
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    mine = tl.arange(0, E_PAD) == e
    first_row = tl.sum(tl.where(mine, tl.cumsum(padded, 0) - padded, 0), 0)
    return first_row, tl.sum(tl.where(mine, counts, 0), 0), tl.sum(tl.where(mine, padded, 0), 0), padded


# n not specialised (a multiple of 16 or not): a batch's pair count is any number, and each
# (chunk, warps) launch compiles once, at the warm-up's powers of two, not again inside a burst
# (the H200's warm-up GPU test named align as the one kernel a burst compiled)
@triton.jit(do_not_specialize=["n"])
def _align_kernel(ids_ptr, sorted_ids_ptr, block_expert_ptr, total_ptr, n,
                  BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, E_PAD: tl.constexpr, USE_PDL: tl.constexpr = False):
    """One program per expert: each counts every expert's pairs (to find where its run starts),
    then writes its own pairs in order, its padding sentinels and its blocks' expert id."""
    gdc_enter(USE_PDL)
    e = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    offs = tl.arange(0, BLOCK)
    counts = tl.zeros((E_PAD,), tl.int32)
    for start in range(0, n, BLOCK):
        ids = tl.load(ids_ptr + start + offs, mask=start + offs < n, other=0).to(tl.int32)
        counts += tl.histogram(ids, E_PAD).to(tl.int32)
    # the masked tail of the last chunk was counted as expert 0
    counts -= tl.where(experts == 0, tl.cdiv(n, BLOCK) * BLOCK - n, 0)
    first_row, count, rows, padded = _expert_run(counts, e, BLOCK_M, E_PAD)
    seen = 0
    for start in range(0, n, BLOCK):
        hit = (tl.load(ids_ptr + start + offs, mask=start + offs < n, other=-1) == e).to(tl.int32)
        rank = seen + tl.cumsum(hit, 0) - 1
        tl.store(sorted_ids_ptr + first_row + rank, start + offs, mask=hit != 0)
        seen += tl.sum(hit, 0)
    for r in range(count, rows, BLOCK):
        tl.store(sorted_ids_ptr + first_row + r + offs, n, mask=r + offs < rows)
    for b in range(0, rows // BLOCK_M, BLOCK):
        tl.store(block_expert_ptr + first_row // BLOCK_M + b + offs, e, mask=b + offs < rows // BLOCK_M)
    if e == 0:
        tl.store(total_ptr, tl.sum(padded, 0))


# align's launch at one warp up to this many pairs (a decode batch of 16 tokens at top-8): 30B fp8
# c16 7.414 -> 7.359 ms with route's at one warp too; at 64 tokens four warps were faster (c64
# 11.27 -> 11.22 ms; alone 5.3 us at one warp). Twenty-third session's engine_ab, on an H200.
ALIGN_ONE_WARP_MAX = 128


def max_sorted_rows(n: int, num_experts: int, block_m: int) -> int:
    """The sorted path's rows for n pairs, bounded without a host sync: each expert's run padded
    to block_m (each pair pads its expert at most once), in whole blocks."""
    rows = min(n + num_experts * (block_m - 1), n * block_m)
    return (rows + block_m - 1) // block_m * block_m


def alignment_buffers(n: int, num_experts: int, block_m: int, device) -> tuple:
    """An alignment's outputs, unset: sorted pair ids (max_sorted_rows), each block's expert and
    the padded total (align_by_expert's launch fills them)."""
    rows = max_sorted_rows(n, num_experts, block_m)
    return (torch.empty(rows, dtype=torch.int32, device=device),
            torch.empty(rows // block_m, dtype=torch.int32, device=device),
            torch.empty(1, dtype=torch.int32, device=device))


# ids a chunk of align's loops (it reads a batch's pairs in chunks of this many, twice), outside
# ALIGN_ONE_CHUNK_MIN < pairs <= ALIGN_ONE_CHUNK_MAX
ALIGN_MAX_BLOCK = 1024
# pairs that align reads as one chunk (a prefill of 513 to 2048 tokens at top-8), at 16 warps up
# to 8192 and 8 past it: on an H200 (benchmarks.kernels --only align, thirty-second session)
# 954 tokens' 7632 pairs took 9.8-10.0 us against 12.9-13.0 in 1024-id chunks, 2048 tokens' 15.2-15.3
# against 24.2; at 256 and 512 tokens one chunk was slower (6.1 against 4.6 us, 8.9 against 7.3)
ALIGN_ONE_CHUNK_MIN, ALIGN_ONE_CHUNK_MAX = 4096, 16384


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int, max_block: int | None = None,
                    warps: int | None = None):
    """(M, A) expert ids -> sorted pair ids padded per expert to block_m, expert per block, padded count.

    Pair id p = token * A + slot; padding uses the sentinel M * A. Sizes are bounded without a
    host sync: at most M*A + E*(block_m - 1) rows; entries past the padded count are left unset
    (the GEMM stops there). One launch; `align_by_expert_reference` is the same in torch.
    `max_block` (a power of two), `warps`: the launch's chunk cap and warps (benchmarks' sweeps).
    """
    flat = topk_ids.flatten()
    n = flat.numel()
    sorted_ids, block_expert, total = alignment_buffers(n, num_experts, block_m, flat.device)
    e_pad = triton.next_power_of_2(num_experts)
    if max_block is None:
        one = ALIGN_ONE_CHUNK_MIN < n <= ALIGN_ONE_CHUNK_MAX
        cap = triton.next_power_of_2(n) if one else ALIGN_MAX_BLOCK
        if warps is None and one:
            warps = switches.warps("align", 16 if n <= 8192 else 8)
    else:
        cap = max_block
    if warps is None:
        warps = switches.warps("align", 1 if n <= ALIGN_ONE_WARP_MAX else 4)
    _align_kernel[(num_experts,)](flat, sorted_ids, block_expert, total, n, BLOCK_M=block_m,
                                  BLOCK=max(e_pad, min(cap, triton.next_power_of_2(n))), E_PAD=e_pad,
                                  num_warps=warps, **pdl(flat))
    return sorted_ids, block_expert, total


def align_by_expert_reference(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """The same contract in plain torch (about twenty launches)."""
    flat = topk_ids.flatten()
    n = flat.numel()
    # scatter_add, not bincount: bincount syncs to size its output, which a CUDA graph cannot hold
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat.long(), torch.ones_like(flat, dtype=torch.int64))
    padded = (counts + block_m - 1) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded
    order = torch.argsort(flat, stable=True)
    rank = torch.arange(n, device=flat.device) - (torch.cumsum(counts, 0) - counts)[flat[order]]
    max_rows = max_sorted_rows(n, num_experts, block_m)
    sorted_ids = torch.full((max_rows,), n, dtype=torch.int32, device=flat.device)
    sorted_ids[starts[flat[order]] + rank] = order.to(torch.int32)
    block_starts = torch.arange(0, max_rows, block_m, device=flat.device)
    # blocks past the real total map past the last expert; num_padded makes the kernel skip them
    block_expert = torch.searchsorted(torch.cumsum(padded, 0), block_starts, right=True).clamp_(max=num_experts - 1)
    total = padded.sum().reshape(1).to(torch.int32)
    return sorted_ids, block_expert.to(torch.int32), total


def _grouped_gemm(a, b, c, weights, sorted_ids, block_expert, total, top_k, a_rows_are_pairs, mul_weight, cfg,
                  fuse_silu=False, scale=None, block=(128, 128), a_scale=None, persistent_off=False):
    """sorted_ids None: one token's pairs, a block each, block_expert its top-k ids (PAIR_BLOCKS).
    A config's "PERSISTENT" (programs an SM) takes the persistent kernel where it applies: sorted
    blocks with no sentinel (`persistent_off`: there may be one), weights unscaled or in tiles
    inside one scale block."""
    n, k = b.shape[1] // (2 if fuse_silu else 1), b.shape[2]
    block_n, block_k, mode = cfg["BLOCK_N"], cfg["BLOCK_K"], 0
    if scale is not None:
        block_n, block_k, mode = _fp8_tile(block_n, block_k, n, block)
    if a_scale is not None and mode != 2:
        raise ValueError(f"fp8 activations need tiles inside the {block} scale blocks (N={n})")
    pair_blocks = sorted_ids is None
    blocks = block_expert.numel() if pair_blocks else triton.cdiv(sorted_ids.numel(), cfg["BLOCK_M"])
    grid = (blocks * triton.cdiv(n, block_n),)
    s = scale if scale is not None else b
    if cfg.get("PERSISTENT") and not pair_blocks and mode != 1 and not persistent_off:
        _grouped_gemm_persistent_kernel[(min(grid[0], cfg["PERSISTENT"] * sm_count(a.device)),)](
            a, b, c, weights, sorted_ids, block_expert, total, s, a_scale if a_scale is not None else s,
            n, k, c.shape[0], top_k,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
            s.stride(0), s.stride(1), a_scale.stride(0) if a_scale is not None else 0,
            A_ROWS_ARE_PAIRS=a_rows_are_pairs, MUL_WEIGHT=mul_weight, FUSE_SILU=fuse_silu,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=cfg["GROUP_M"],
            SCALED=scale is not None, BN=block[0], BK=block[1], A_SCALED=a_scale is not None,
            SCALES_AHEAD=switches.SCALES_AHEAD, WEIGHTS_EARLY=bool(cfg.get("WEIGHTS_EARLY")),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl(a))
        return
    if pair_blocks:
        sorted_ids = total = block_expert
    _grouped_gemm_kernel[grid](
        a, b, c, weights, sorted_ids, block_expert, total, s,
        n, k, c.shape[0], top_k, b.shape[0],
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        s.stride(0), s.stride(1),
        A_ROWS_ARE_PAIRS=a_rows_are_pairs, MUL_WEIGHT=mul_weight, FUSE_SILU=fuse_silu,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=cfg["GROUP_M"],
        SCALE_MODE=mode, BN=block[0], BK=block[1], SCALES_AHEAD=switches.SCALES_AHEAD,
        as_ptr=a_scale if a_scale is not None else s, stride_asm=a_scale.stride(0) if a_scale is not None else 0,
        A_SCALED=a_scale is not None, PAIR_BLOCKS=pair_blocks, SWAP_AB=bool(cfg.get("SWAP_AB")),
        WEIGHTS_EARLY=bool(cfg.get("WEIGHTS_EARLY")), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **pdl(a),
    )


@functools.lru_cache(maxsize=None)
def _sm_count(device_type: str, index: int | None) -> int:
    if device_type != "cuda":
        return 4                        # the interpreter: a few programs, each several tiles
    return torch.cuda.get_device_properties(index if index is not None else torch.cuda.current_device()
                                            ).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessors of `device` (persistent launches size their grids by it); 4 off a GPU."""
    return _sm_count(device.type, device.index)


def _fp8_tile(block_n: int, block_k: int, n: int, block: tuple[int, int]) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, SCALE_MODE) for fp8 weights: tiles shrunk (powers of two, at least 16)
    to lie inside one scale block, mode 2; where the blocks or N do not allow it, mode 1."""
    bn = max(dividing(block_n, math.gcd(block[0], n)), 16)
    bk = max(dividing(min(block_k, block[1]), block[1]), 16)
    if block[0] % bn == 0 and n % bn == 0 and block[1] % bk == 0:
        return bn, bk, 2
    return min(block_n, block[0]), bk, 1


@triton.jit
def _pair_gate_up_entry(ids_ptr, top_k, USE_PDL: tl.constexpr, PREFETCH: tl.constexpr):
    """A gate_up program's start: PDL's launch and wait (PREFETCH: the wait first, so that the
    down kernel after it launches only once the router's kernel has finished), then its pair,
    column block, token and expert id."""
    if PREFETCH:
        gdc_wait(USE_PDL)
        gdc_launch(USE_PDL)
    else:
        gdc_enter(USE_PDL)
    pair = tl.program_id(0)
    return pair, tl.program_id(1), pair // top_k, tl.load(ids_ptr + pair)


@triton.jit
def _pair_gate_up_step(acc_g, acc_u, g, u, xk, s_gate, s_up, k, K, k_ok, offs_k, BLOCK_K: tl.constexpr,
                       BK: tl.constexpr, HAS_SCALE: tl.constexpr, GROUP_SCALE: tl.constexpr):
    """K step k of a pair gate_up kernel: its gate and up weights (float32) times x's columns and,
    for fp8 (HAS_SCALE), the rows' scales (GROUP_SCALE: once per block of the step; else one per
    column), added into the accumulators."""
    if HAS_SCALE and GROUP_SCALE:
        acc_g += g * block_scaled(xk, s_gate, k, K, BLOCK_K, BK, 0)[None, :]
        acc_u += u * block_scaled(xk, s_up, k, K, BLOCK_K, BK, 0)[None, :]
    elif HAS_SCALE:
        kb = (k * BLOCK_K + offs_k) // BK
        acc_g += g * (xk * tl.load(s_gate + kb, mask=k_ok, other=0.0))[None, :]
        acc_u += u * (xk * tl.load(s_up + kb, mask=k_ok, other=0.0))[None, :]
    else:
        acc_g += g * xk[None, :]
        acc_u += u * xk[None, :]
    return acc_g, acc_u


@triton.jit
def _pair_gate_up_kernel(x_ptr, w_ptr, ids_ptr, act_ptr, s_ptr, inter, K, top_k, num_experts,
                         stride_xm, stride_we, stride_wn, stride_am, stride_se, stride_sn,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         HAS_SCALE: tl.constexpr = False, BN: tl.constexpr = 128, BK: tl.constexpr = 128,
                         USE_PDL: tl.constexpr = False, GROUP_SCALE: tl.constexpr = False,
                         PREFETCH: tl.constexpr = False):
    """HAS_SCALE: fp8 weights; BLOCK_N divides BN and the intermediate size, so the gate rows and
    the up rows of a program each share one row of scale blocks, applied to x's columns.
    GROUP_SCALE (BLOCK_K and BK powers of two): a K step loads each scale once per block.
    PREFETCH (with PDL): the down kernel after it may launch only once the kernel before this one
    (the router's) has finished, so that down may read the routing before its own wait.
    (Loading each K step's weights a step ahead in registers, PIPE, was slower in the step at
    every shape tried: NOTES, twenty-seventh session.)"""
    pair, pid_n, token, expert = _pair_gate_up_entry(ids_ptr, top_k, USE_PDL, PREFETCH)
    expert = expert.to(tl.int64)
    if expert >= num_experts:             # another rank's expert (expert parallelism): its row is never read
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < inter
    offs_k = tl.arange(0, BLOCK_K)
    gate_ptrs = w_ptr + expert * stride_we + offs_n[:, None] * stride_wn + offs_k[None, :]
    up_ptrs = gate_ptrs + inter * stride_wn
    x_ptrs = x_ptr + token * stride_xm + offs_k
    acc_g = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    s_gate = s_ptr + expert * stride_se + ((pid_n * BLOCK_N) // BN) * stride_sn
    s_up = s_ptr + expert * stride_se + ((pid_n * BLOCK_N + inter) // BN) * stride_sn
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k * BLOCK_K
        xk = tl.load(x_ptrs, mask=k_ok, other=0.0).to(tl.float32)
        m = n_ok[:, None] & k_ok[None, :]
        g = tl.load(gate_ptrs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(up_ptrs, mask=m, other=0.0).to(tl.float32)
        acc_g, acc_u = _pair_gate_up_step(acc_g, acc_u, g, u, xk, s_gate, s_up, k, K, k_ok, offs_k, BLOCK_K, BK,
                                          HAS_SCALE, GROUP_SCALE)
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    g = tl.sum(acc_g, 1)
    u = tl.sum(acc_u, 1)
    act = g / (1.0 + tl.exp(-g)) * u
    tl.store(act_ptr + pair * stride_am + offs_n, act.to(act_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _pair_down_step(acc, w, a_ptrs, s_rows, slot_ok, offs_k, k, K, BLOCK_K: tl.constexpr, BK: tl.constexpr,
                    TOP_K_PAD: tl.constexpr, HAS_SCALE: tl.constexpr, GROUP_SCALE: tl.constexpr):
    """K step k of the pair down kernel: its activations (scaled per expert for fp8) times the
    step's weights `w`, into the 3-D accumulator."""
    a_mask = slot_ok[:, None] & (offs_k < K - k * BLOCK_K)[None, :]
    a = tl.load(a_ptrs, mask=a_mask, other=0.0).to(tl.float32)
    if HAS_SCALE and GROUP_SCALE:
        a = block_scaled(a, s_rows, k, K, BLOCK_K, BK, TOP_K_PAD)
    elif HAS_SCALE:
        a = a * tl.load(s_rows + ((k * BLOCK_K + offs_k) // BK)[None, :], mask=a_mask, other=0.0)
    return acc + w.to(tl.float32) * a[:, None, :]


@triton.jit
def _pair_down_kernel(act_ptr, w_ptr, ids_ptr, weights_ptr, out_ptr, s_ptr, N, K, top_k, num_experts,
                      stride_am, stride_we, stride_wn, stride_om, stride_se, stride_sn,
                      TOP_K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      HAS_SCALE: tl.constexpr = False, BN: tl.constexpr = 128, BK: tl.constexpr = 128,
                      USE_PDL: tl.constexpr = False, GROUP_SCALE: tl.constexpr = False,
                      PREFETCH: tl.constexpr = False):
    """One program per (token, column block) with all its top-k experts in one 3-D tile, so the
    routing weights and the combine happen in registers (no per-pair output, no sum launch).
    HAS_SCALE: fp8 weights, BLOCK_N dividing BN; each expert's scales multiply its activations
    (GROUP_SCALE: loaded once per block of a K step, BLOCK_K and BK powers of two).
    PREFETCH (with PDL, after a gate_up launched with it, which finished the router's kernel
    before letting this one launch): the routing and the first K step's weights are read before
    the wait for gate_up (which writes neither). Another rank's expert (id E) has no scale row:
    its slot reads expert 0's (finite, times zero activations and weight; GROUP_SCALE's loads are
    not masked by slot). (Each slot a 2-D tile of its own, summed into one accumulator, took 96
    registers against this tile's 240 on sm_90 and was slower in every shape tried on an H200:
    NOTES, thirty-first session.)"""
    if PREFETCH:
        gdc_launch(USE_PDL)
    else:
        gdc_enter(USE_PDL)
    token = tl.program_id(0)
    pid_n = tl.program_id(1)
    slots = tl.arange(0, TOP_K_PAD)
    slot_ok = slots < top_k
    pairs = token * top_k + slots
    experts = tl.load(ids_ptr + pairs, mask=slot_ok, other=0).to(tl.int64)
    slot_ok = slot_ok & (experts < num_experts)
    experts = tl.where(slot_ok, experts, 0)
    weights = tl.load(weights_ptr + pairs, mask=slot_ok, other=0.0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = (w_ptr + experts[:, None, None] * stride_we + offs_n[None, :, None] * stride_wn
              + offs_k[None, None, :])
    a_ptrs = act_ptr + pairs[:, None] * stride_am + offs_k[None, :]
    acc = tl.zeros((TOP_K_PAD, BLOCK_N, BLOCK_K), tl.float32)
    s_rows = s_ptr + experts[:, None] * stride_se + ((pid_n * BLOCK_N) // BN) * stride_sn
    k_first = 0
    if PREFETCH:
        w_mask = slot_ok[:, None, None] & n_ok[None, :, None] & (offs_k < K)[None, None, :]
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)
        gdc_wait(USE_PDL)
        acc = _pair_down_step(acc, w, a_ptrs, s_rows, slot_ok, offs_k, 0, K, BLOCK_K, BK, TOP_K_PAD,
                              HAS_SCALE, GROUP_SCALE)
        w_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
        k_first = 1
    for k in range(k_first, tl.cdiv(K, BLOCK_K)):
        w_mask = slot_ok[:, None, None] & n_ok[None, :, None] & (offs_k < K - k * BLOCK_K)[None, None, :]
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)
        acc = _pair_down_step(acc, w, a_ptrs, s_rows, slot_ok, offs_k, k, K, BLOCK_K, BK, TOP_K_PAD,
                              HAS_SCALE, GROUP_SCALE)
        w_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    out = tl.sum(tl.sum(acc, 2) * weights[:, None], 0)
    tl.store(out_ptr + token * stride_om + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _pair_gate_up_tma_kernel(x_ptr, w_desc, ids_ptr, act_ptr, s_ptr, inter, K, top_k, num_experts,
                             stride_xm, stride_am, stride_se, stride_sn,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                             HAS_SCALE: tl.constexpr = False, BN: tl.constexpr = 128, BK: tl.constexpr = 128,
                             USE_PDL: tl.constexpr = False, PREFETCH: tl.constexpr = False):
    """_pair_gate_up_kernel with its weight tiles read through a TMA tensor descriptor (`w_desc`:
    w13 as (E * 2I, K) rows, a (BLOCK_N, BLOCK_K) box, zero past its edges), which Triton keeps
    STAGES - 1 K steps ahead in shared memory (the plain kernel's register loads, feeding no
    tl.dot, go a K step at a time). Scales a block at a time (GROUP_SCALE's): a scale gathered
    per column would be pipelined too, as 4-byte async copies, and bound the kernel by L1 (Nsight
    Compute on the H200, NOTES). Rows past the intermediate size read the next rows (up's, or
    the next expert's: finite) and are not stored."""
    pair, pid_n, token, expert = _pair_gate_up_entry(ids_ptr, top_k, USE_PDL, PREFETCH)
    if expert >= num_experts:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    row = expert * 2 * inter + pid_n * BLOCK_N
    x_ptrs = x_ptr + token * stride_xm + offs_k
    acc_g = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    s_gate = s_ptr + expert.to(tl.int64) * stride_se + ((pid_n * BLOCK_N) // BN) * stride_sn
    s_up = s_ptr + expert.to(tl.int64) * stride_se + ((pid_n * BLOCK_N + inter) // BN) * stride_sn
    for k in tl.range(0, tl.cdiv(K, BLOCK_K), num_stages=STAGES):
        k_ok = offs_k < K - k * BLOCK_K
        xk = tl.load(x_ptrs + k * BLOCK_K, mask=k_ok, other=0.0).to(tl.float32)
        g = w_desc.load([row, k * BLOCK_K]).to(tl.float32)
        u = w_desc.load([row + inter, k * BLOCK_K]).to(tl.float32)
        acc_g, acc_u = _pair_gate_up_step(acc_g, acc_u, g, u, xk, s_gate, s_up, k, K, k_ok, offs_k, BLOCK_K, BK,
                                          HAS_SCALE, True)
    g = tl.sum(acc_g, 1)
    u = tl.sum(acc_u, 1)
    act = g / (1.0 + tl.exp(-g)) * u
    tl.store(act_ptr + pair * stride_am + offs_n, act.to(act_ptr.dtype.element_ty), mask=offs_n < inter)


def dense_fp8_gemm(x: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                   cfg: dict) -> torch.Tensor:
    """y = x @ W.T for a decode batch's rows, W fp8 (N, K) in `block` scale blocks (qwen3vl_kernels/fp8.py):
    the grouped GEMM with one expert and its rows in order (DENSE), so neither a sort nor ids.
    cfg: BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, A8 (the rows quantized per
    token and block-wide group first, one launch, and fp8 tensor-core dots: W8A8; else the weight
    tiles become x's dtype in registers, W8A16; BITS, bfloat16 x: by integer ops), SPLIT_K
    (each tile's K steps shared by that many programs: a narrow N fills the SMs), and L2_PREFETCH
    (each program asks L2 for its weights before PDL's wait, while the kernel before runs; the
    PTX on a GPU only), SWAP_AB (the dots with the weight rows as the tensor cores' M side, so a
    16-row batch runs sm_90's wgmma where BLOCK_N is 64 or more), GLUON (a launch shape of
    qwen3vl_kernels.gluon_dense's W8A8 GEMM, taken where it can run: 1-64 rows on a Hopper GPU; the keys
    beside it are the launch elsewhere). x (M, K) bf16/float32 -> (M, N) in x's dtype."""
    return dense_gemm(x, wq, cfg, scale, block)


def dense_gemm(x: torch.Tensor, w: torch.Tensor, cfg: dict, scale: torch.Tensor | None = None,
               block: tuple[int, int] | None = None) -> torch.Tensor:
    """dense_fp8_gemm's launch; without `scale`, w is in x's dtype (bf16/float32 weights: a small
    layer's GEMM split over K, e.g. 30B's MoE router, 128 x 2048, at 16 rows, where the skinny
    kernel's few programs each streamed all of K: qwen3vl_kernels.linear.skinny_linear's SPLIT_K entries)."""
    m, k = x.shape
    n = w.shape[0]
    fp8 = scale is not None
    if (w.shape[1] != k or w.stride(-1) != 1 or x.dtype not in (torch.bfloat16, torch.float16, torch.float32)
            or (not fp8 and w.dtype != x.dtype)):
        raise ValueError(f"dense_gemm: x {tuple(x.shape)} {x.dtype}, w {tuple(w.shape)} {w.dtype}")
    if fp8:
        block_n, block_k, mode = _fp8_tile(cfg["BLOCK_N"], cfg["BLOCK_K"], n, block)
    else:
        block_n, block_k, mode, scale, block = cfg["BLOCK_N"], cfg["BLOCK_K"], 0, w, (128, 128)
    a8 = bool(cfg.get("A8")) and mode == 2 and block_k >= 32
    bits = bool(cfg.get("BITS")) and mode == 2 and not a8 and x.dtype == torch.bfloat16
    x = x if x.stride(-1) == 1 else x.contiguous()
    glu = cfg.get("GLUON")          # qwen3vl_kernels.gluon_dense's launch shape; the keys beside it where it cannot run
    if (fp8 and glu and x.is_cuda and gluon_dense.launch_ok(m, n, k, block, glu["BLOCK_N"])
            and gluon_dense.fits(m, k, glu)):
        return _dense_gluon(x, w, scale, block, glu)
    a, a_scale = quantize_activations_fp8(x, block[1]) if a8 else (x, None)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if not m:
        return y
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, block_n)
    split, ws, counts = _split_k_buffers(min(cfg.get("SPLIT_K", 1), triton.cdiv(k, block_k)), tiles, y)
    prefetch = bool(cfg.get("L2_PREFETCH"))
    # a program's weight row: its split's K steps, in 128-byte lines
    lines = triton.next_power_of_2(-(-triton.cdiv(triton.cdiv(k, block_k), split) * block_k * w.element_size() // 128)) \
        if prefetch else 1
    _grouped_gemm_kernel[(tiles, split)](
        a, w, y, scale, scale, scale, scale, scale, n, k, m, 1, 1,
        a.stride(0), a.stride(1), 0, w.stride(0), w.stride(1), y.stride(0), y.stride(1), 0,
        scale.stride(0) if fp8 else 0,
        A_ROWS_ARE_PAIRS=True, MUL_WEIGHT=False, FUSE_SILU=False, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=block_n,
        BLOCK_K=block_k, GROUP_M=cfg["GROUP_M"], SCALE_MODE=mode, BN=block[0], BK=block[1],
        SCALES_AHEAD=switches.SCALES_AHEAD,
        as_ptr=a_scale if a8 else scale, stride_asm=a_scale.stride(0) if a8 else 0, A_SCALED=a8, DENSE=True,
        SPLIT_K=split, ws_ptr=ws, count_ptr=counts, BITS=bits, ASM=(bits or prefetch) and x.is_cuda,
        L2_PREFETCH=prefetch, LINES=lines, SWAP_AB=bool(cfg.get("SWAP_AB")), num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **pdl(x))
    return y


def _dense_gluon(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                 cfg: dict) -> torch.Tensor:
    """dense_gemm's GLUON launch shape (cfg: BLOCK_N, SPLIT_K, num_stages, num_warps): the rows
    quantized per token and 128-wide group (one launch), then qwen3vl_kernels.gluon_dense's W8A8 GEMM
    (each K step's product overlapping the scaling of the step before), split over K as SPLIT_K
    asks."""
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    tiles = triton.cdiv(m, gluon_dense.block_t(m)) * triton.cdiv(n, cfg["BLOCK_N"])
    split, ws, counts = _split_k_buffers(gluon_dense.steps_split(k, cfg.get("SPLIT_K", 1))[1], tiles, y)
    a8, sa = quantize_activations_fp8(x, block[1])
    return gluon_dense.w8a8(a8, sa, w, scale, block, y, cfg, split, ws, counts, pdl(x))


def _split_k_buffers(split: int, tiles: int, y: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(split, float32 workspace (split, M, N), per-tile counts) for a split-K launch of `tiles`
    output tiles into y (M, N); (1, y, y), no split, for one split or more tiles than the counts."""
    if split > 1 and tiles <= TILE_COUNTS:
        return split, torch.empty(split, *y.shape, dtype=torch.float32, device=y.device), tile_counts(y.device)
    return 1, y, y


TILE_COUNTS = 1 << 14           # the most output tiles one split-K launch counts (more: no split)
_TILE_COUNTS: dict[torch.device, torch.Tensor] = {}


def tile_counts(device: torch.device) -> torch.Tensor:
    """The split-K launches' per-tile counts on `device`: zero between launches (each tile's last
    program resets its own), so the launches sharing them must run one after another, as the
    decoder's do on its one stream (the ViT, on a stream of its own, has no fp8 layers). Made once,
    on the first launch: that is an eager pass (the model runner's warm-up runs every batch size
    before capturing it), never inside a graph capture."""
    counts = _TILE_COUNTS.get(device)
    if counts is None:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("dense_fp8_gemm: split-K's tile counts are made by an eager launch first, not "
                               "inside a CUDA graph capture")
        counts = _TILE_COUNTS[device] = torch.zeros(TILE_COUNTS, dtype=torch.int32, device=device)
    return counts


# SiLU*mul in the gate_up GEMM's epilogue (a config's "FUSE_SILU" chooses; benchmarks.kernels times both)
FUSE_SILU = True


# Below this many tokens the pair path wins (a GEMV per pair beats sorting; measured on H200 by
# benchmarks.kernels, which times both paths).
PAIR_PATH_MAX_M = 16

# The sorted path at one token: a block per (token, expert) pair straight from the top-k ids,
# without align_by_expert's launch (~2.5 us of a 235B-A22B decode layer at --ep 2, where batch 1
# takes the sorted path). False (or a config's "PAIR_BLOCKS" False): the token's pairs are sorted
# as any batch's (for comparison).
PAIR_BLOCKS_AT_ONE_TOKEN = os.environ.get("QWEN3VL_MOE_PAIR_BLOCKS", "1") != "0"

# The sorted path with fp8 weights quantizes its activations too (per token and block-wide group:
# x before gate_up, the SiLU*up intermediate before down) and runs fp8 tensor-core dots (W8A8)
# from this many tokens; below it the weights would be converted to the activations' dtype in
# registers (W8A16). Measured on the H200 (kernels-*-054809, 30B-A3B, uniform routing) W8A8 wins at
# every M measured: 0.35 against 0.44 ms at M=64, 0.42 / 0.73 at 256, 0.91 / 1.15 at 2048, 1.99 /
# 3.17 at 8192. (The sorted path takes M <= PAIR_PATH_MAX_M only where a tuned table says so.)
W8A8_MIN_M = 1

PAIR_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "DOWN_BLOCK_N": 8, "DOWN_BLOCK_K": 128,
               "down_warps": 4}
# measured best launch shapes by M (benchmarks.kernels sweeps them, each call streaming its experts
# from memory; H100, 2026-11-21), nearest M used
PAIR_CONFIGS = {1: {"BLOCK_N": 8, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3,
                    "DOWN_BLOCK_N": 8, "DOWN_BLOCK_K": 256, "down_warps": 4, "down_stages": 1},
                8: {"BLOCK_N": 8, "BLOCK_K": 128, "num_warps": 8, "num_stages": 1,
                    "DOWN_BLOCK_N": 8, "DOWN_BLOCK_K": 128, "down_warps": 2, "down_stages": 1}}


def fp8_pair_config_file(device_name: str, block: tuple[int, int]) -> Path:
    return device_file("fp8_pairs", device_name, f",block={block[0]}x{block[1]}")


@functools.lru_cache(maxsize=None)
def _fp8_pair_table(device_name: str, block: tuple[int, int]) -> dict[int, dict] | None:
    """{M: launch shape} for fp8 experts of any shape (`benchmarks.kernels`' first sweep); a
    shape's own MoE table may hold "pairs", which comes first."""
    return device_table(lambda name: fp8_pair_config_file(name, block), device_name)


def pair_config(e: int, inter: int, hidden: int, m: int, device: torch.device, fp8_block=None) -> dict:
    """The pair path's launch shape at the nearest tuned M: the shape's MoE table's "pairs"
    (`benchmarks.tune_fused_moe --pairs`), else (fp8) the device's shape-free fp8 table, else
    PAIR_CONFIGS."""
    table = (_moe_table(e, inter, hidden, device, fp8_block) or {}).get("pairs")
    if table:
        return table[min(table, key=lambda key: abs(int(key) - m))]
    table = (_fp8_pair_table(torch.cuda.get_device_name(device), tuple(fp8_block))
             if fp8_block and device.type == "cuda" else None) or PAIR_CONFIGS
    return table[min(table, key=lambda key: abs(key - m))]


def fused_moe_pairs(x, w13, w2, topk_weights, topk_ids, config: dict | None = None, w13_scale=None, w2_scale=None,
                    block=(128, 128), prefetch: bool | None = None) -> torch.Tensor:
    """The small-batch path: no sorting; gate_up+SiLU*mul per pair, then down with the routing
    weights and the top-k combine per token (two launches). With scales, w13/w2 are fp8 blocks
    dequantized in registers. `config` overrides the table's keys it names. `prefetch`: the
    kernels' PREFETCH, down reading its routing and first weights before PDL's wait (default
    qwen3vl_kernels.switches.PDL_PREFETCH)."""
    prefetch = switches.PDL_PREFETCH if prefetch is None else prefetch
    m, h = x.shape
    e, two_i, _ = w13.shape
    top_k = topk_ids.shape[1]
    inter = two_i // 2
    if w13.stride(-1) != 1 or w2.stride(-1) != 1 or x.stride(-1) != 1:
        raise ValueError("fused_moe_pairs needs the last dims of x, w13 and w2 contiguous")
    fp8 = w13_scale is not None
    cfg = {**pair_config(e, inter, h, m, x.device, tuple(block) if fp8 else None), **(config or {})}
    s13, s2 = (w13_scale, w2_scale) if fp8 else (w13, w2)
    ids = topk_ids.to(torch.int32).contiguous()
    weights = topk_weights.to(torch.float32).contiguous()
    act = torch.empty(m * top_k, inter, dtype=x.dtype, device=x.device)
    up_n = dividing(cfg["BLOCK_N"], math.gcd(block[0], inter)) if fp8 else cfg["BLOCK_N"]
    up = dict(BLOCK_N=up_n, BLOCK_K=cfg["BLOCK_K"], HAS_SCALE=fp8, BN=block[0], BK=block[1],
              num_warps=cfg["num_warps"], PREFETCH=prefetch, **pdl(x))
    if cfg.get("TMA") and tma_rows_ok(w13, up_n, cfg["BLOCK_K"], block if fp8 else None):
        _pair_gate_up_tma_kernel[(m * top_k, triton.cdiv(inter, up_n))](
            x, tma_rows(w13, up_n, cfg["BLOCK_K"]), ids, act, s13, inter, h, top_k, e, x.stride(0), act.stride(0),
            s13.stride(0), s13.stride(1), STAGES=cfg.get("num_stages", 3), **up)
    else:
        _pair_gate_up_kernel[(m * top_k, triton.cdiv(inter, up_n))](
            x, w13, ids, act, s13, inter, h, top_k, e, x.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
            s13.stride(0), s13.stride(1), num_stages=cfg.get("num_stages", 3),
            GROUP_SCALE=fp8 and group_scale_ok(cfg.get("GROUP_SCALE"), cfg["BLOCK_K"], block[1]), **up)
    out = torch.empty_like(x)
    down_n = dividing(cfg["DOWN_BLOCK_N"], block[0]) if fp8 else cfg["DOWN_BLOCK_N"]
    # (down through a TMA descriptor was slower in every shape tried on an H200 and is gone: NOTES,
    # thirtieth session)
    _pair_down_kernel[(m, triton.cdiv(h, down_n))](
        act, w2, ids, weights, out, s2, h, inter, top_k, e, act.stride(0), w2.stride(0), w2.stride(1), out.stride(0),
        s2.stride(0), s2.stride(1), TOP_K_PAD=triton.next_power_of_2(top_k), BLOCK_N=down_n,
        BLOCK_K=cfg["DOWN_BLOCK_K"], HAS_SCALE=fp8, BN=block[0], BK=block[1],
        num_warps=cfg["down_warps"], num_stages=cfg.get("down_stages", 3),
        GROUP_SCALE=fp8 and group_scale_ok(cfg.get("DOWN_GROUP_SCALE"), cfg["DOWN_BLOCK_K"], block[1]),
        PREFETCH=prefetch, **pdl(x))
    return out


def tma_rows_ok(w: torch.Tensor, block_n: int, block_k: int, fp8_block=None) -> bool:
    """Whether `w` (E, R, K) can be read as (E * R, K) rows through a TMA descriptor with a
    (block_n, block_k) box: contiguous, rows 16-byte aligned, power-of-two box sides of at most
    256 (TMA's largest) with at least 16 bytes a box row, on Hopper or later (or the interpreter);
    fp8 weights (`fp8_block`) also a power-of-two scale block width (the TMA kernel scales a
    block at a time)."""
    if w.dim() != 3 or not w.is_contiguous() or w.data_ptr() % 16 or (w.shape[2] * w.element_size()) % 16:
        return False
    if fp8_block is not None and not group_scale_ok(True, block_k, fp8_block[1]):
        return False
    if any(v & (v - 1) or v > 256 for v in (block_n, block_k)) or block_k * w.element_size() < 16:
        return False
    if _tensor_descriptor() is None:
        return False
    return not w.is_cuda or torch.cuda.get_device_capability(w.device)[0] >= 9


@functools.lru_cache(maxsize=None)
def _tensor_descriptor():
    """Triton's host-side TensorDescriptor, or None where this Triton has none (before 3.4): the
    plain kernels run there."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        log.warning("this Triton has no host-side tensor descriptors: the pair kernels' TMA keys are ignored")
        return None
    return TensorDescriptor


def tma_rows(w: torch.Tensor, block_n: int, block_k: int):
    """`w` (E, R, K) as a TMA descriptor of (E * R, K) rows and a (block_n, block_k) box."""
    return _tensor_descriptor()(w, [w.shape[0] * w.shape[1], w.shape[2]], [w.shape[2], 1], [block_n, block_k])


@triton.jit
def _route_row(logits, offs, ok, weights_ptr, ids_ptr, row, first, n_local, TOP_K: tl.constexpr,
               TOP_K_PAD: tl.constexpr, RENORMALIZE: tl.constexpr):
    """One row's routing from its logits (float32): the top-k by logit, largest first (ties to the
    lower id), one reduction each; their softmax weights over all experts, or over the top-k
    alone when RENORMALIZE (the same numbers as softmax -> top-k -> renormalise). Stored as this
    rank's experts see them: id - first where that is below n_local, else n_local (the sentinel)
    with weight 0 (no expert parallelism: first 0, n_local E)."""
    slots = tl.arange(0, TOP_K_PAD)
    vals = tl.full((TOP_K_PAD,), float("-inf"), tl.float32)
    ids = tl.zeros((TOP_K_PAD,), tl.int32)
    left = tl.where(ok, logits, float("-inf"))
    for j in tl.static_range(TOP_K):
        best, idx = tl.max(left, 0, return_indices=True, return_indices_tie_break_left=True)
        vals = tl.where(slots == j, best, vals)
        ids = tl.where(slots == j, idx.to(tl.int32), ids)
        left = tl.where(offs == idx, float("-inf"), left)
    top = tl.max(vals, 0)
    e = tl.exp(vals - top)
    if RENORMALIZE:
        norm = tl.sum(e, 0)
    else:
        norm = tl.sum(tl.where(ok, tl.exp(logits - top), 0.0), 0)
    local = ids - first
    mine = (local >= 0) & (local < n_local)
    tl.store(weights_ptr + row * TOP_K + slots, tl.where(mine, e / norm, 0.0), mask=slots < TOP_K)
    tl.store(ids_ptr + row * TOP_K + slots, tl.where(mine, local, n_local), mask=slots < TOP_K)


@triton.jit
def _route_kernel(logits_ptr, weights_ptr, ids_ptr, E, stride_lm, first, n_local, TOP_K: tl.constexpr,
                  TOP_K_PAD: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr,
                  USE_PDL: tl.constexpr = False):
    gdc_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    ok = offs < E
    logits = tl.load(logits_ptr + row * stride_lm + offs, mask=ok, other=float("-inf")).to(tl.float32)
    _route_row(logits, offs, ok, weights_ptr, ids_ptr, row, first, n_local, TOP_K, TOP_K_PAD, RENORMALIZE)


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool, first_expert: int = 0,
          num_local: int | None = None):
    """router_logits (T, E) -> weights (T, A) float32, expert ids (T, A) int32; one launch.
    `first_expert`, `num_local`: expert parallelism, ids as the layer's experts on this rank
    see them (qwen3vl_backend.layers.moe.route's contract)."""
    t, e = router_logits.shape
    if top_k > e or router_logits.stride(-1) != 1:
        raise ValueError(f"route: top_k {top_k} of {e} experts (logits' last dim contiguous)")
    weights = torch.empty(t, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int32, device=router_logits.device)
    if t:
        _route_kernel[(t,)](router_logits, weights, ids, e, router_logits.stride(0), first_expert,
                            e if num_local is None else num_local, TOP_K=top_k,
                            TOP_K_PAD=triton.next_power_of_2(top_k), RENORMALIZE=renormalize,
                            BLOCK_E=triton.next_power_of_2(e), num_warps=switches.warps("route", 1),
                            **pdl(router_logits))
    return weights, ids


@triton.jit
def _norm_route_kernel(x_ptr, res_ptr, nw_ptr, h_ptr, new_res_ptr, gw_ptr, logits_ptr, fixed_ptr, weights_ptr,
                       ids_ptr, count_ptr, D, E, eps, first, n_local, TOP_K: tl.constexpr, TOP_K_PAD: tl.constexpr,
                       RENORMALIZE: tl.constexpr, FIXED: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
                       E_PAD: tl.constexpr, USE_PDL: tl.constexpr = False, PREFETCH: tl.constexpr = False):
    """One token (BLOCK_D >= D: every load is issued at once). Each program: s = x + residual and
    h = RMSNorm(s) (program 0 writes both), then the router logits of its BLOCK_E experts, rounded
    to h's dtype as the router's linear layer would. The program that finishes last (an atomic
    count) routes the token as `route` does and resets the count for the next launch. FIXED:
    route on `fixed_ptr`'s logits instead (uniform-routing benchmarks; the router still runs).
    PREFETCH (with PDL): the router's rows are read before the wait for the kernel before."""
    if PREFETCH:
        gdc_launch(USE_PDL)
    else:
        gdc_enter(USE_PDL)
    pid = tl.program_id(0)
    offs_e = pid * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    w = tl.load(gw_ptr + offs_e[:, None] * D + d[None, :], mask=e_ok[:, None] & d_ok[None, :], other=0.0)
    if PREFETCH:
        gdc_wait(USE_PDL)
    s = tl.load(x_ptr + d, mask=d_ok, other=0.0) + tl.load(res_ptr + d, mask=d_ok, other=0.0)
    sf = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(sf * sf, 0) / D + eps)
    h = ((sf * rstd).to(s.dtype) * tl.load(nw_ptr + d, mask=d_ok, other=0.0)).to(s.dtype)
    if pid == 0:
        tl.store(new_res_ptr + d, s, mask=d_ok)
        tl.store(h_ptr + d, h, mask=d_ok)
    logits = tl.sum(w.to(tl.float32) * h.to(tl.float32)[None, :], 1)
    tl.store(logits_ptr + offs_e, logits.to(h_ptr.dtype.element_ty).to(tl.float32), mask=e_ok)
    # release this program's logits; the last one to arrive sees everyone's
    count = tl.atomic_add(count_ptr, 1, sem="acq_rel")
    if count == tl.num_programs(0) - 1:
        offs = tl.arange(0, E_PAD)
        ok = offs < E
        if FIXED:
            lg = tl.load(fixed_ptr + offs, mask=ok, other=float("-inf")).to(tl.float32)
        else:
            lg = tl.load(logits_ptr + offs, mask=ok, other=float("-inf"), volatile=True)
        _route_row(lg, offs, ok, weights_ptr, ids_ptr, 0, first, n_local, TOP_K, TOP_K_PAD, RENORMALIZE)
        tl.atomic_xchg(count_ptr, 0)


NORM_ROUTE_MAX_D = 4096        # the gate's rows in registers: up to Qwen3-VL-235B's hidden size
# router rows a program, warps: the launch shape without a table entry for (D, E)
NORM_ROUTE_CONFIG = {"BLOCK_E": 4, "num_warps": 8}


def norm_route_config_file(device_name: str) -> Path:
    return device_file("norm_route", device_name)


@functools.lru_cache(maxsize=None)
def _norm_route_table(device_name: str) -> dict:
    """{"D,E": launch shape}, written by `benchmarks.kernels --only normroute --write-configs`."""
    return device_table(norm_route_config_file, device_name) or {}


def norm_route_config(d: int, e: int, device: torch.device) -> dict:
    table = _norm_route_table(torch.cuda.get_device_name(device)) if device.type == "cuda" else {}
    return {**NORM_ROUTE_CONFIG, **table.get(f"{d},{e}", {})}


def norm_route(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
               gate_weight: torch.Tensor, top_k: int, renormalize: bool, counter: torch.Tensor,
               fixed_logits: torch.Tensor | None = None, first_expert: int = 0, num_local: int | None = None,
               config: dict | None = None, prefetch: bool | None = None):
    """The post-attention RMSNorm (after the residual add) and the router in one launch, for one
    token (batch-1 decode). x, residual (1, D); gate_weight (E, D); `counter` one int32, zero
    between launches (this resets it). -> (h = norm(x + residual), x + residual, weights (1, A)
    float32, ids (1, A) int32), as RMSNorm then `route(h @ gate_weight.T, ..., first_expert,
    num_local)` give them. `config`: the launch shape (norm_route_config's keys), else the table's.
    `prefetch`: the kernel's PREFETCH (default qwen3vl_kernels.switches.PDL_PREFETCH)."""
    m, d = x.shape
    e = gate_weight.shape[0]
    if (m != 1 or d > NORM_ROUTE_MAX_D or residual.shape != x.shape or gate_weight.shape[1] != d or top_k > e
            or not (x.is_contiguous() and residual.is_contiguous() and gate_weight.is_contiguous())
            or counter.dtype != torch.int32):
        raise ValueError(f"norm_route: x {tuple(x.shape)}, residual {tuple(residual.shape)}, gate "
                         f"{tuple(gate_weight.shape)}, top_k {top_k}: one token of at most {NORM_ROUTE_MAX_D}, "
                         f"contiguous")
    h, new_res = torch.empty_like(x), torch.empty_like(x)
    logits = torch.empty(e, dtype=torch.float32, device=x.device)
    weights = torch.empty(1, top_k, dtype=torch.float32, device=x.device)
    ids = torch.empty(1, top_k, dtype=torch.int32, device=x.device)
    cfg = {**norm_route_config(d, e, x.device), **(config or {})}
    block_e = cfg["BLOCK_E"]
    fixed = fixed_logits if fixed_logits is not None else logits
    _norm_route_kernel[(triton.cdiv(e, block_e),)](
        x, residual, norm_weight, h, new_res, gate_weight, logits, fixed, weights, ids, counter, d, e, eps,
        first_expert, e if num_local is None else num_local, TOP_K=top_k, TOP_K_PAD=triton.next_power_of_2(top_k),
        RENORMALIZE=renormalize, FIXED=fixed_logits is not None, BLOCK_E=block_e, BLOCK_D=triton.next_power_of_2(d),
        E_PAD=triton.next_power_of_2(e), num_warps=cfg["num_warps"],
        PREFETCH=switches.PDL_PREFETCH if prefetch is None else prefetch, **pdl(x))
    return h, new_res, weights, ids


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, config: dict | None = None, w13_scale: torch.Tensor | None = None,
              w2_scale: torch.Tensor | None = None, block: tuple[int, int] = (128, 128),
              sentinel: bool = False) -> torch.Tensor:
    """x (M, H), w13 (E, 2I, H), w2 (E, H, I), routing (M, A) -> (M, H). With `w13_scale`
    (E, ceil(2I/bn), ceil(H/bk)) and `w2_scale` (E, ceil(H/bn), ceil(I/bk)), the weights are fp8
    blocks (qwen3vl_kernels/fp8.py). `sentinel`: ids may equal E, pairs routed to another rank's experts
    (expert parallelism), which add nothing here."""
    m, h = x.shape
    e, two_i, h2 = w13.shape
    if h2 != h or w2.shape != (e, h, two_i // 2) or topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != m:
        raise ValueError(f"fused_moe shapes disagree: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, "
                         f"w2 {tuple(w2.shape)}, topk {tuple(topk_ids.shape)}")
    if m == 0:
        return torch.empty_like(x)
    fp8_block = tuple(block) if w13_scale is not None else None
    path = _sorted_path(m, w13, x.device, fp8_block, config)
    if path is None:
        return fused_moe_pairs(x, w13, w2, topk_weights, topk_ids, None, w13_scale, w2_scale, block)
    top_k = topk_ids.shape[1]
    cfg, pair_blocks = path
    # the config may choose the paths (tests and benchmarks compare them); else the defaults
    fuse_silu = cfg.get("FUSE_SILU", FUSE_SILU)
    # "DOWN": the down GEMM's own tile, warps or stages (its K and N are not gate_up's); the
    # blocks of rows stay gate_up's
    down_cfg = {**cfg, **{k: v for k, v in cfg.get("DOWN", {}).items() if k != "BLOCK_M"}}
    # ids equal to e (another rank's experts) form the sentinel's blocks, which the GEMMs skip.
    # One token meets each of its experts once: a block per pair, no sorting launch.
    if pair_blocks:
        sorted_ids, block_expert, total = None, topk_ids.reshape(-1).to(torch.int32), None
    else:
        sorted_ids, block_expert, total = align_by_expert(topk_ids, e + 1 if sentinel else e, cfg["BLOCK_M"])
    weights = topk_weights.to(torch.float32).flatten().contiguous()
    fp8 = {"block": block} if w13_scale is not None else {}
    tiles = [_fp8_tile(bn, bk, n, block) for bn, bk, n in (
        (max(16, cfg["BLOCK_N"] // 2) if fuse_silu else cfg["BLOCK_N"], cfg["BLOCK_K"], two_i // 2),
        (down_cfg["BLOCK_N"], down_cfg["BLOCK_K"], h))]
    # fp8 dots need tiles inside one scale block and K steps of 32 or more
    w8a8 = (bool(fp8) and m >= w8a8_min_m(e, two_i // 2, h, x.device, fp8_block)
            and all(mode == 2 and bk >= 32 for _, bk, mode in tiles))
    a, a_scale = (quantize_activations_fp8(x, block[1]) if w8a8 else (x, None))
    if fuse_silu:     # two accumulators per program: half the columns keeps the tuned register budget
        act = torch.empty(m * top_k, two_i // 2, dtype=x.dtype, device=x.device)
        half = {**cfg, "BLOCK_N": max(16, cfg["BLOCK_N"] // 2)}
        _grouped_gemm(a, w13, act, weights, sorted_ids, block_expert, total, top_k, False, False, half, True,
                      scale=w13_scale, a_scale=a_scale, persistent_off=sentinel, **fp8)
    else:
        gate_up = torch.empty(m * top_k, two_i, dtype=x.dtype, device=x.device)
        _grouped_gemm(a, w13, gate_up, weights, sorted_ids, block_expert, total, top_k, False, False, cfg,
                      scale=w13_scale, a_scale=a_scale, persistent_off=sentinel, **fp8)
        gate, up = gate_up.chunk(2, dim=-1)
        act = torch.nn.functional.silu(gate) * up
    act, act_scale = (quantize_activations_fp8(act, block[1]) if w8a8 else (act, None))
    # the sentinel's rows are never written: the combine skips them (no zero fill)
    out = torch.empty(m * top_k, h, dtype=x.dtype, device=x.device)
    _grouped_gemm(act, w2, out, weights, sorted_ids, block_expert, total, top_k, True, True, down_cfg, scale=w2_scale,
                  a_scale=act_scale, persistent_off=sentinel, **fp8)
    return sum_top_k(out.view(m, top_k, h), topk_ids if sentinel else None, e)


@triton.jit
def _sum_top_k_kernel(in_ptr, out_ptr, ids_ptr, N, num_experts, TOP_K: tl.constexpr, BLOCK: tl.constexpr,
                      SKIP_SENTINEL: tl.constexpr = False, USE_PDL: tl.constexpr = False):
    gdc_enter(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    acc = tl.zeros((BLOCK,), tl.float32)
    for j in tl.static_range(TOP_K):
        row_ok = ok
        if SKIP_SENTINEL:
            row_ok = ok & (tl.load(ids_ptr + token * TOP_K + j) < num_experts)
        acc += tl.load(in_ptr + (token * TOP_K + j) * N + offs, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * N + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def sum_top_k(pairs: torch.Tensor, topk_ids: torch.Tensor | None = None, num_experts: int = 0) -> torch.Tensor:
    """(M, A, H) contiguous -> (M, H): the top-k combine, float32 accumulation (one launch where
    torch's reduction takes ~5 us at M=64). With `topk_ids` (M, A), pairs whose id is
    `num_experts` or more (another rank's expert) are skipped: their rows may hold anything."""
    m, a, h = pairs.shape
    out = torch.empty(m, h, dtype=pairs.dtype, device=pairs.device)
    block = min(1024, triton.next_power_of_2(h))
    ids = topk_ids.contiguous() if topk_ids is not None else pairs
    _sum_top_k_kernel[(m, triton.cdiv(h, block))](pairs, out, ids, h, num_experts, TOP_K=a, BLOCK=block,
                                                  SKIP_SENTINEL=topk_ids is not None,
                                                  num_warps=switches.warps("sum_top_k", 4), **pdl(pairs))
    return out


def fused_moe_reference(x, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """Plain PyTorch: one expert at a time over its tokens (float32 accumulation)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for ex in topk_ids.unique().tolist():
        tok, slot = torch.where(topk_ids == ex)
        gate, up = (x[tok].float() @ w13[ex].float().T).chunk(2, dim=-1)
        y = (torch.nn.functional.silu(gate) * up) @ w2[ex].float().T
        out.index_add_(0, tok, y * topk_weights[tok, slot, None].float())
    return out.to(x.dtype)


# -- launch configs ---------------------------------------------------------------------------------
def config_file(e: int, n: int, k: int, device_name: str, fp8_block: tuple[int, int] | None = None) -> Path:
    """The sorted path's table: {M: launch shape}, and optionally "pair_path_max_m" (the largest M
    the pair path takes; PAIR_PATH_MAX_M without it). fp8 experts (W8A8 from W8A8_MIN_M) have their
    own table per block shape, the bf16 one standing in where it is missing."""
    fp8 = f",dtype=fp8_w8a8,block={fp8_block[0]}x{fp8_block[1]}" if fp8_block else ""
    return device_file(f"E={e},N={n},K={k}", device_name, fp8)


def _moe_table(e: int, inter: int, hidden: int, device: torch.device, fp8_block=None) -> dict | None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return _find_moe_table(e, inter, hidden, name, device.type == "cuda", fp8_block)


@functools.lru_cache(maxsize=None)
def _find_moe_table(e: int, inter: int, hidden: int, name: str, cuda: bool, fp8_block) -> dict | None:
    """The first table that exists: for the dtype, then the bf16 one standing in for fp8, each
    this GPU's or the home device's (qwen3vl_kernels/tables.py); None (the default config, warned once)
    without any. Off a GPU none is read."""
    for blk in ((fp8_block, None) if fp8_block else (None,)):
        table = device_table(lambda n: config_file(e, inter, hidden, n, blk), name) if cuda else None
        if table is not None:
            return table
    log.warning("no tuned fused-MoE config for E=%d I=%d H=%d on %s; using the default", e, inter, hidden, name)
    return None


def _sorted_path(m: int, w13: torch.Tensor, device: torch.device, fp8_block=None,
                 config: dict | None = None) -> tuple[dict, bool] | None:
    """fused_moe's path for m tokens with these experts (E, 2I, H): None where the pair path takes
    them (a `config` given always takes the sorted one), else the sorted path's launch and whether
    its blocks are the one token's pairs (PAIR_BLOCKS: no sorting)."""
    e, two_i, h = w13.shape
    if config is None and m <= pair_path_max_m(e, two_i // 2, h, device, fp8_block):
        return None
    cfg = config or lookup_config(e, two_i // 2, h, m, device, fp8_block)
    return cfg, bool(m == 1 and cfg.get("PAIR_BLOCKS", PAIR_BLOCKS_AT_ONE_TOKEN))


def lookup_config(e: int, inter: int, hidden: int, m: int, device: torch.device, fp8_block=None) -> dict:
    table = _moe_table(e, inter, hidden, device, fp8_block)
    sizes = [k for k in (table or ()) if isinstance(k, int)]
    if not sizes:
        return DEFAULT_CONFIG
    return table[min(sizes, key=lambda key: abs(key - m))]


def _table_setting(key: str, env: str, default: int, e: int, inter: int, hidden: int, device: torch.device,
                   fp8_block) -> int:
    """A shape's table setting: the environment variable `env` when set (to compare inside a
    whole step), else the table's `key`, else `default`."""
    if os.environ.get(env):
        return int(os.environ[env])
    table = _moe_table(e, inter, hidden, device, fp8_block)
    return int((table or {}).get(key, default))


def pair_path_max_m(e: int, inter: int, hidden: int, device: torch.device, fp8_block=None) -> int:
    """The largest M the pair path takes: the table's crossover; QWEN3VL_PAIR_MAX_M overrides it."""
    return _table_setting("pair_path_max_m", "QWEN3VL_PAIR_MAX_M", PAIR_PATH_MAX_M, e, inter, hidden, device,
                          fp8_block)


def w8a8_min_m(e: int, inter: int, hidden: int, device: torch.device, fp8_block=None) -> int:
    """The fewest tokens the sorted path quantizes its activations for (W8A8); below, the fp8
    weights meet bf16 activations (W8A16: two quantize launches fewer a layer). The table's
    "w8a8_min_m", else W8A8_MIN_M; QWEN3VL_W8A8_MIN_M overrides both."""
    return _table_setting("w8a8_min_m", "QWEN3VL_W8A8_MIN_M", W8A8_MIN_M, e, inter, hidden, device, fp8_block)

