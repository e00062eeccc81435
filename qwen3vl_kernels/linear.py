"""Skinny GEMM for decode: y = x @ w.T (+ bias) for a few rows of x (M <= 16).

A decode step's projections read a whole weight matrix for one to sixteen tokens: pure memory
traffic, where cuBLAS picks small-tile kernels (with a split-K reduction for long K) that reach
half the copy bandwidth on 17-21 MB matrices. Here each program streams BLOCK_N weight rows once:
M == 1 multiplies and sums in registers; 2 <= M <= 16 pads the rows to 16 for tl.dot.

Launch shapes per (N, K) and M are data (qwen3vl_kernels/configs/skinny_linear,device=*.json), written by
`python -m benchmarks.kernels --tune-linear`; a shape the table marks "cublas" (or M past the
table) runs F.linear, and an entry with SPLIT_K (up to SPLIT_MAX_M rows) the split-K grouped GEMM.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .pdl import gdc_launch, gdc_wait, pdl
from .tables import device_file, device_table

MAX_M = 16
# A table entry with SPLIT_K runs the grouped GEMM's dense split-K launch instead
# (qwen3vl_kernels.fused_moe.dense_gemm), up to this many rows: for shapes whose N is too narrow to fill
# the GPU with programs that each stream all of K (the MoE router's 128 x 2048: 6 us at 16 rows
# through this kernel, 5.4 at 64 through cuBLAS, for 0.5 MB).
SPLIT_MAX_M = 128
DEFAULT_CONFIG = {"BLOCK_N": 8, "BLOCK_K": 512, "num_warps": 4, "num_stages": 3}


@triton.jit
def e4m3_groups(x):
    """float32 rows, each one group of a token's columns -> (the rows over their scales, clamped
    to e4m3's range, not yet cast; the scales, amax / 448, at least 1e-12 / 448): the activations'
    per-group quantization, one definition for every kernel that makes W8A8 inputs (qwen3vl_kernels.fp8's
    quantize launches, the skinny GEMM's A8), so that they agree bit for bit."""
    scale = tl.maximum(tl.max(tl.abs(x), 1), 1e-12) / 448.0
    return tl.clamp(x / scale[:, None], -448.0, 448.0), scale


@triton.jit
def block_scaled(x, s_ptrs, k, K, BLOCK_K: tl.constexpr, BK: tl.constexpr, ROWS: tl.constexpr):
    """x (BLOCK_K,) (ROWS 0) or (ROWS, BLOCK_K), K step k's columns, times their scale blocks'
    scales: one a step inside a block (BLOCK_K <= BK), else one per block of the step (its
    BLOCK_K // BK whole blocks). s_ptrs: the scale row's pointer, () or (ROWS, 1) (rows of x
    whose weights have scale rows of their own: the pair down kernel's experts)."""
    # One return at the end: Triton's compiler goes on past a return inside a constexpr branch
    # (the ROWS path was compiled for ROWS 0 and failed on the H200; the interpreter hid it).
    if BLOCK_K <= BK:
        out = x * tl.load(s_ptrs + (k * BLOCK_K) // BK)
    else:
        g = k * (BLOCK_K // BK) + tl.arange(0, BLOCK_K // BK)
        if ROWS == 0:
            sc = tl.load(s_ptrs + g, mask=g * BK < K, other=0.0)
            out = tl.reshape(tl.reshape(x, (BLOCK_K // BK, BK)) * sc[:, None], (BLOCK_K,))
        else:
            sc = tl.load(s_ptrs + g[None, :], mask=(g * BK < K)[None, :], other=0.0)
            out = tl.reshape(tl.reshape(x, (ROWS, BLOCK_K // BK, BK)) * sc[:, :, None], (ROWS, BLOCK_K))
    return out


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, b_ptr, y_ptr, s_ptr, M, N, K, stride_xm, stride_wn, stride_ym, stride_sn,
                   HAS_BIAS: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   HAS_SCALE: tl.constexpr = False, BN: tl.constexpr = 128, BK: tl.constexpr = 128,
                   A8: tl.constexpr = False, USE_PDL: tl.constexpr = False, GROUP_SCALE: tl.constexpr = False,
                   res_ptr=None, nw_ptr=None, new_res_ptr=None, eps=0.0, NORM: tl.constexpr = False,
                   K_PAD: tl.constexpr = 1):
    """HAS_SCALE: w is fp8 with a float32 scale per BN x BK block (qwen3vl_kernels/fp8.py). BLOCK_N divides
    BN, so a program's rows share one row of the scale grid: the scales multiply x's columns
    (BLOCK_K of them per step, any BLOCK_K), and the weight costs one conversion per element, as
    bf16 does. A8 (with HAS_SCALE, M_PAD 16, BLOCK_K == BK): each program quantizes its x rows per
    BK group in registers and the product is an fp8 tensor-core dot (W8A8; no conversion of w).
    GROUP_SCALE (HAS_SCALE; BLOCK_K and BK powers of two, one a multiple of the other): each K step
    loads its scales once per block instead of once per column.
    NORM (one row, M_PAD 1): x is the layer's input before its RMSNorm: each program takes
    s = x + residual (`res_ptr`) and its statistics over all K (K_PAD >= K) and multiplies by
    RMSNorm(s) (weight `nw_ptr`), as qwen3vl_kernels.rmsnorm rounds it; program 0 writes s to
    `new_res_ptr` (the next residual). One launch a decode layer fewer."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, M_PAD)
    m_ok = offs_m < M
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    s_row = s_ptr + ((pid * BLOCK_N) // BN) * stride_sn
    if M_PAD == 1:
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    else:
        acc = tl.zeros((M_PAD, BLOCK_N), tl.float32)
    # the first weight tile is in flight while the kernel before finishes (PDL), each next one
    # while this one is used
    gdc_launch(USE_PDL)
    w = tl.load(w_ptrs, mask=n_ok[:, None] & (offs_k < K)[None, :], other=0.0)
    gdc_wait(USE_PDL)
    if NORM:
        cols = tl.arange(0, K_PAD)
        s_all = (tl.load(x_ptr + cols, mask=cols < K, other=0.0) + tl.load(res_ptr + cols, mask=cols < K, other=0.0))
        rstd = 1.0 / tl.sqrt(tl.sum(s_all.to(tl.float32) * s_all.to(tl.float32), 0) / K + eps)
        if pid == 0:
            tl.store(new_res_ptr + cols, s_all, mask=cols < K)
        r_ptrs = res_ptr + offs_k[None, :]
        nw_ptrs = nw_ptr + offs_k[None, :]
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k * BLOCK_K
        xk = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM:
            sk = xk + tl.load(r_ptrs, mask=k_ok[None, :], other=0.0)
            xk = ((sk.to(tl.float32) * rstd).to(sk.dtype) * tl.load(nw_ptrs, mask=k_ok[None, :], other=0.0)).to(sk.dtype)
            r_ptrs += BLOCK_K
            nw_ptrs += BLOCK_K
        xf = xk.to(tl.float32)
        if A8:
            xq, xs = e4m3_groups(xf)
            acc += tl.dot(xq.to(w.dtype), tl.trans(w)) * (xs[:, None] * tl.load(s_row + k))
        else:
            if HAS_SCALE and GROUP_SCALE:
                xf = block_scaled(xf, s_row, k, K, BLOCK_K, BK, M_PAD)      # every row's scales alike
            elif HAS_SCALE:
                xf = xf * tl.load(s_row + (k * BLOCK_K + offs_k) // BK, mask=k_ok, other=0.0)[None, :]
            if M_PAD == 1:
                acc2 += w.to(tl.float32) * xf
            elif HAS_SCALE:
                acc = tl.dot(xf.to(xk.dtype), tl.trans(w.to(xk.dtype)), acc)
            else:
                acc = tl.dot(xk, tl.trans(w.to(xk.dtype)), acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        w = tl.load(w_ptrs, mask=n_ok[:, None] & (offs_k < K - (k + 1) * BLOCK_K)[None, :], other=0.0)
    if M_PAD == 1:
        acc = tl.sum(acc2, 1)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def norm_arguments(x: torch.Tensor, norm: tuple) -> dict:
    """_skinny_kernel's NORM arguments for x (1, K) and norm = (residual (1, K), weight (K,), eps,
    the next residual's tensor (1, K), written)."""
    residual, weight, eps, new_residual = norm
    if (x.shape[0] != 1 or residual.shape != x.shape or new_residual.shape != x.shape or weight.shape != x.shape[1:]
            or not (x.is_contiguous() and residual.is_contiguous() and new_residual.is_contiguous())):
        raise ValueError(f"the GEMV's input RMSNorm: one contiguous row, x {tuple(x.shape)}, residual "
                         f"{tuple(residual.shape)}, weight {tuple(weight.shape)}")
    return dict(res_ptr=residual, nw_ptr=weight, new_res_ptr=new_residual, eps=eps, NORM=True,
                K_PAD=triton.next_power_of_2(x.shape[1]))


def skinny_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                  config: dict | None = None, norm: tuple | None = None) -> torch.Tensor | None:
    """x (M, K), w (N, K) -> (M, N); M <= MAX_M rows with our kernel (or the table's choice).
    `norm` (norm_arguments'): x is one row before its residual add and RMSNorm, done in the
    kernel; None is returned where the table leaves this shape to F.linear."""
    m, k = x.shape
    n = w.shape[0]
    if config is None:
        config = lookup_config(n, k, m, x.device) if 0 < m <= SPLIT_MAX_M else None
        # a SPLIT_K entry takes no bias and no input norm: those go as if the table had none
        if config is None or (("SPLIT_K" in config) and (bias is not None or norm is not None)) or (
                m > MAX_M and "SPLIT_K" not in config):
            return None if norm is not None else F.linear(x, w, bias)
    if "SPLIT_K" in config:
        if bias is not None or norm is not None:
            raise ValueError("skinny_linear: a SPLIT_K launch takes no bias and no input norm")
        from .fused_moe import dense_gemm           # (fused_moe imports this module)
        return dense_gemm(x, w, config)
    if m > MAX_M or w.shape[1] != k or w.stride(-1) != 1:
        raise ValueError(f"skinny_linear: x {tuple(x.shape)} w {tuple(w.shape)} (M <= {MAX_M}, w's rows contiguous)")
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    m_pad = 1 if m == 1 else 16
    block_n = config["BLOCK_N"] if m_pad == 1 else max(16, config["BLOCK_N"])
    _skinny_kernel[(triton.cdiv(n, block_n),)](
        x, w, bias if bias is not None else w, y, w, m, n, k, x.stride(0), w.stride(0), y.stride(0), 0,
        HAS_BIAS=bias is not None, M_PAD=m_pad, BLOCK_N=block_n, BLOCK_K=config["BLOCK_K"],
        num_warps=config["num_warps"], num_stages=config["num_stages"],
        **(norm_arguments(x, norm) if norm is not None else {}), **pdl(x))
    return y


def config_file(device_name: str) -> Path:
    return device_file("skinny_linear", device_name)


@functools.lru_cache(maxsize=None)
def _table(device_name: str) -> dict:
    """{"N,K": {"M": config or "cublas"}} (qwen3vl_kernels/tables.py's lookup), or {}."""
    return device_table(config_file, device_name) or {}


def dividing(size: int, total: int) -> int:
    """The largest power of two <= size that divides total (size a power of two)."""
    while size > 1 and total % size:
        size //= 2
    return size


def nearest_m(table: dict, n: int, k: int, m: int, default):
    """A {"N,K": {"M": entry}} table's entry for (N, K) at the nearest tuned M, or `default`. One
    row and several are different kernels (a row at a time; rows padded to 16 for tl.dot), so an
    entry tuned for one never stands in for the other: a 2048-wide K step tuned for one row made
    235B's o_proj at 16 rows a 16 x 2048 dot tile (tp 2, c16: 93 ms a step against 31)."""
    by_m = {int(key): entry for key, entry in table.get(f"{n},{k}", {}).items() if (int(key) == 1) == (m == 1)}
    return by_m[min(by_m, key=lambda key: abs(key - m))] if by_m else default


def lookup_config(n: int, k: int, m: int, device: torch.device) -> dict | None:
    """The launch shape for this (N, K) at the nearest tuned M; None: F.linear is faster there."""
    if device.type != "cuda":
        return DEFAULT_CONFIG
    cfg = nearest_m(_table(torch.cuda.get_device_name(device)), n, k, m, DEFAULT_CONFIG)
    return None if cfg == "cublas" else cfg


def table_linear(x: torch.Tensor, w: torch.Tensor, table: dict | None = None) -> torch.Tensor:
    """x @ w.T by skinny_linear where the table (default: the device's; none off a GPU) names a
    launch for this (N, K) and row count itself (no default shape), else F.linear: the vocabulary
    projection (0.6 GB a 30B decode step; cuBLAS streams it at ~4.2 TB/s on an H200) leaves
    cuBLAS only where a launch was measured faster in the step (the H200's 151936 x 2048 at one
    row: BLOCK_N 2, 0.4% off the 30B fp8 c1 step; NOTES, thirty-ninth session)."""
    m, k = x.shape
    if table is None:
        table = _table(torch.cuda.get_device_name(x.device)) if x.is_cuda else {}
    cfg = nearest_m(table, w.shape[0], k, m, None) if 0 < m <= MAX_M else None
    if not isinstance(cfg, dict) or "SPLIT_K" in cfg:
        return F.linear(x, w)
    return skinny_linear(x, w, config=cfg)


def skinny_linear_reference(x, w, bias=None) -> torch.Tensor:
    return F.linear(x.float(), w.float(), None if bias is None else bias.float()).to(x.dtype)
