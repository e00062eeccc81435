"""The fp8 projections at decode batches (16-64 rows) as a warp-specialized, TMA-fed W8A8 GEMM.

Why: the one-expert grouped GEMM (`fused_moe.dense_fp8_gemm`) reads these layers' weights at a
quarter of HBM's rate at 64 rows (Nsight Compute on an H200: qkv 8.5 us, 26% of DRAM; NOTES,
thirty-fourth session). Each K step's block scales multiply its finished product, so each step's
tensor-core dot must complete before the next, and the same warps that wait on it issue the
loads. Here a producer warp issues the weight and activation tiles through TMA descriptors into a
ring of shared-memory buffers (`tl.range(..., warp_specialize=True)`, Triton 3.5+ on sm_90), and
the consumer warpgroup only multiplies and scales, so the loads run ahead of the dots' waits.

The product is the same W8A8 arithmetic as the grouped GEMM's A8 launch: activations quantized per
token and `block[1]`-wide group (kernels.fp8.quantize_activations_fp8), weights fp8 in (bn, bk)
blocks with one float32 scale each, every K step's tile inside one scale block, float32
accumulation. SWAP_AB computes each tile transposed (the weight rows the tensor cores' M side, 64
a warpgroup on sm_90), so 16 rows need no 64-row tile. SPLIT_K shares a tile's K steps among that
many programs, which sum their float32 partials in split order (the grouped GEMM's scheme: the
last program of a tile, by an atomic count, adds them up), so the answer never depends on which
finished first.

Off the GPU the same kernel runs in Triton's interpreter (tests), where warp specialization is
ignored and descriptors read through plain loads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import gdc_launch, gdc_wait, pdl

# A dense table entry's "WS" picks this kernel: true, warp-specialized; "tma", the same kernel
# without the producer warp (its loads pipelined by the consumer), to tell the two apart.


@triton.jit
def _dense_ws_kernel(a_desc, w_desc, c_ptr, as_ptr, s_ptr, ws_ptr, count_ptr, M, N, K,
                     stride_cm, stride_asm, stride_sn,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, SWAP_AB: tl.constexpr,
                     WARP_SPECIALIZE: tl.constexpr, STAGES: tl.constexpr, USE_PDL: tl.constexpr = False):
    """One (BLOCK_M, BLOCK_N) output tile (program_id 0: N tiles, 1: its K split, 2: M tiles)."""
    gdc_launch(USE_PDL)
    gdc_wait(USE_PDL)
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    steps = tl.cdiv(K, BLOCK_K)
    per = tl.cdiv(steps, SPLIT_K)
    k_first = split * per
    k_last = tl.minimum(steps, k_first + per)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = offs_m < M
    s_row = s_ptr + ((pid_n * BLOCK_N) // BN) * stride_sn
    as_rows = as_ptr + offs_m * stride_asm
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in tl.range(k_first, k_last, num_stages=STAGES, warp_specialize=WARP_SPECIALIZE):
        a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])          # (BLOCK_M, BLOCK_K) fp8; past M or K: 0
        b = w_desc.load([pid_n * BLOCK_N, k * BLOCK_K])          # (BLOCK_N, BLOCK_K) fp8
        kb = (k * BLOCK_K) // BK
        s_w = tl.load(s_row + kb)
        s_a = tl.load(as_rows + kb, mask=valid, other=0.0)
        if SWAP_AB:
            acc += tl.dot(b, a.T) * (s_a[None, :] * s_w)
        else:
            acc += tl.dot(a, b.T) * (s_a[:, None] * s_w)
    if SWAP_AB:
        out = tl.trans(acc)
    else:
        out = acc
    c_mask = valid[:, None] & (offs_n[None, :] < N)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    if SPLIT_K > 1:
        tile = pid_m * tl.num_programs(0) + pid_n
        part = offs_m[:, None] * N + offs_n[None, :]
        tl.store(ws_ptr + split * M * N + part, out, mask=c_mask)
        tl.debug_barrier()              # every thread's partial stored before the count releases it
        if tl.atomic_add(count_ptr + tile, 1, sem="acq_rel") == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(0, SPLIT_K):
                total += tl.load(ws_ptr + s * M * N + part, mask=c_mask, other=0.0, volatile=True)
            tl.store(c_ptrs, total.to(c_ptr.dtype.element_ty), mask=c_mask)
            tl.atomic_xchg(count_ptr + tile, 0)
    else:
        tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=c_mask)


def descriptor(t: torch.Tensor, box: list[int]):
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor(t, list(t.shape), list(t.stride()), box)


def ws_ok(m: int, n: int, k: int, cfg: dict, block: tuple[int, int]) -> bool:
    """Whether the launch shape fits this kernel: tiles inside one scale block, TMA's box limits
    (power-of-two sides of 16 to 256), fp8 rows 16-byte aligned (K a multiple of 16). N and M need
    not fill the last tile: TMA reads zeros past the ends, and the stores are masked."""
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    if any(v & (v - 1) or v > 256 or v < 16 for v in (bm, bn, bk)):
        return False
    return block[0] % bn == 0 and block[1] % bk == 0 and k % 16 == 0


def specialized(cfg: dict) -> bool:
    """Whether the launch runs warp-specialized: "WS" true and the dots' M side (BLOCK_N with
    SWAP_AB, else BLOCK_M) 128, which Triton 3.6 splits between its two consumer warpgroups, 64
    rows each. Where that side is 64 it cannot split it and gives each consumer group the whole
    tile (twice the work, both storing it; the sm_90 TTGIR shows it), and on an H200 such a launch
    gave different bits from one run to the next (NOTES, thirty-fifth session): those run the
    same kernel without the producer warp."""
    side = cfg["BLOCK_N"] if cfg.get("SWAP_AB") else cfg["BLOCK_M"]
    return cfg.get("WS") is True and side == 128


def dense_ws_gemm(a: torch.Tensor, a_scale: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor,
                  block: tuple[int, int], cfg: dict, out_dtype: torch.dtype, ws=None, counts=None) -> torch.Tensor:
    """a (M, K) fp8 with a_scale (M, ceil(K/bk)) float32, wq (N, K) fp8 with scale (ceil(N/bn),
    ceil(K/bk)) -> (M, N) out_dtype. ws / counts: the split-K workspace (SPLIT_K, M, N) float32
    and per-tile counts (zero between launches), where cfg's SPLIT_K > 1."""
    m, k = a.shape
    n = wq.shape[0]
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    y = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if not m:
        return y
    split = min(cfg.get("SPLIT_K", 1), triton.cdiv(k, bk)) if ws is not None else 1
    grid = (triton.cdiv(n, bn), split, triton.cdiv(m, bm))
    _dense_ws_kernel[grid](
        descriptor(a, [bm, bk]), descriptor(wq, [bn, bk]), y, a_scale, scale, ws if ws is not None else y,
        counts if counts is not None else y, m, n, k, y.stride(0), a_scale.stride(0), scale.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BN=block[0], BK=block[1], SPLIT_K=split,
        SWAP_AB=bool(cfg.get("SWAP_AB")), WARP_SPECIALIZE=specialized(cfg) and a.is_cuda,
        STAGES=cfg["num_stages"], num_warps=cfg["num_warps"], **pdl(a))
    return y
