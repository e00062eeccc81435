"""Block-scaled FP8 (e4m3) as Qwen's FP8 releases store it, with PyTorch references.

Weights W (N, K) are stored as Wq float8_e4m3fn (N, K) and `weight_scale_inv` S float32
(ceil(N/bn), ceil(K/bk)): W[n, k] = Wq[n, k] * S[n // bn, k // bk]; edge blocks are partial.
Activations are quantized dynamically, per token and per bk-wide group of its features, with
scale = amax / 448 (e4m3's largest finite value). The W8A8 product is then
sum over k-groups g of (Xq_g . Wq_g^T) * xs[t, g] * S[n // bn, g].

Shapes: T = tokens, N = output features, K = input features, bn x bk = the block.
The references are what the GPU paths are checked against; on CPU the layers run them.

GPU paths (`fp8_linear`): up to 16 rows (decode), the skinny GEMM's kernel (qwen3vl_kernels/linear.py)
streams the fp8 weight once: a program's rows share one row of scale blocks, so the scales
multiply x's columns and each weight element costs one conversion, as a bf16 one does (fp8
weights, bf16 activations: half the bytes, which is what a decode step pays for). At one row a
launch shape may ask for the row kernel instead (`_fp8_row_kernel`), the bytes read four to an
int32: INT_CVT makes them float32 by integer ops, not by the conversion unit (235B-A22B's o_proj
at tp 2: 8.6 -> 7.2 us on an H200); HALF2 makes pairs of them f16x2 in one instruction and
multiplies in float16 pairs (30B-A3B's o_proj: 5.4 -> 4.2 us). At one row the GEMV is bound by
its instructions, not by HBM: a kernel that only loads the same weights takes 3.3 us for qkv
against INT_CVT's 5.9. Its launch shapes per (N, K) and M are a table per device and block
(`benchmarks.kernels --only fp8gemv --write-configs`). More rows go to cuBLAS's block-scaled
fp8 GEMM (torch.nn.functional.scaled_mm, activations quantized per 1x128 group by one Triton
launch) where the shapes are whole 128 blocks, else to a bf16 matmul of the dequantized weight.
A decode batch (2 to DENSE_MAX_M rows) may instead take the fused MoE's grouped GEMM with one
expert (`qwen3vl_kernels.fused_moe.dense_fp8_gemm`), where the device's fp8_dense table has a launch shape
for its (N, K) and M. On an H200 cuBLAS's kernel there (128x128 tiles, 16-40 of them for these
shapes) took 11 us for 30B's qkv at 64 rows against bf16's 8.4, and the GEMV 18 us at 16 rows
(`benchmarks.kernels --only fp8dense --write-configs` times both paths and writes the table).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import switches
from .pdl import gdc_enter, gdc_launch, gdc_wait, pdl

from .linear import _skinny_kernel, block_scaled, dividing, e4m3_groups, nearest_m, norm_arguments
from .tables import device_file, device_table

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def scale_grid(n: int, k: int, block: tuple[int, int]) -> tuple[int, int]:
    return -(-n // block[0]), -(-k // block[1])


def quantize_weight_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """W (N, K) -> (Wq fp8 (N, K), S float32 (ceil(N/bn), ceil(K/bk))) with each block's amax at 448."""
    n, k = w.shape
    bn, bk = block
    gn, gk = scale_grid(n, k, block)
    padded = torch.zeros(gn * bn, gk * bk, dtype=torch.float32, device=w.device)
    padded[:n, :k] = w.float()
    blocks = padded.view(gn, bn, gk, bk)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = amax / FP8_MAX
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(gn * bn, gk * bk)[:n, :k]
    return q.to(FP8), scale


def dequantize_weight_blocks(wq: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Wq (N, K) fp8 and S (ceil(N/bn), ceil(K/bk)) -> W (N, K) in `dtype`."""
    n, k = wq.shape
    if tuple(scale.shape) != scale_grid(n, k, block):
        raise ValueError(f"scale grid {tuple(scale.shape)} does not match a ({n}, {k}) weight in {block} blocks")
    s = scale.repeat_interleave(block[0], 0)[:n].repeat_interleave(block[1], 1)[:, :k]
    return (wq.float() * s).to(dtype)


def quantize_activations(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """X (T, K) -> (Xq fp8 (T, K), xs float32 (T, ceil(K/group))): per token, per group of features."""
    t, k = x.shape
    g = -(-k // group)
    if k % group:                      # a partial last group: zeros do not move its amax
        padded = torch.zeros(t, g * group, dtype=torch.float32, device=x.device)
        padded[:, :k] = x.float()
    else:
        padded = x.float()
    groups = padded.view(t, g, group)
    scale = groups.abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX
    q = (groups / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).view(t, g * group)[:, :k]
    return q.to(FP8), scale


def w8a8_block_linear_reference(x: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                                bias: torch.Tensor | None = None) -> torch.Tensor:
    """Y = X W^T with X quantized per (token, bk group) and W per block; accumulated in float32,
    returned in X's dtype. X (T, K) or (..., K)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    xq, xs = quantize_activations(x2, block[1])
    xd = xq.float() * xs.repeat_interleave(block[1], 1)[:, : x2.shape[1]]
    y = xd @ dequantize_weight_blocks(wq, scale, block).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*shape[:-1], wq.shape[0])


# -- GPU ---------------------------------------------------------------------------------------------

@triton.jit
def _quantize_groups_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, stride_sm, stride_sg,
                            GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, GROUPS: tl.constexpr,
                            USE_PDL: tl.constexpr = False):
    """One program per token and GROUPS groups: amax per group, scale = amax / 448, x / scale in e4m3."""
    gdc_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    col = g[:, None] * GROUP + tl.arange(0, GROUP_PAD)[None, :]
    ok = (tl.arange(0, GROUP_PAD)[None, :] < GROUP) & (col < K)
    x = tl.load(x_ptr + row * stride_xm + col, mask=ok, other=0.0).to(tl.float32)
    q, scale = e4m3_groups(x)
    tl.store(q_ptr + row * stride_qm + col, q.to(q_ptr.dtype.element_ty), mask=ok)
    tl.store(s_ptr + row * stride_sm + g * stride_sg, scale, mask=g * GROUP < K)


@triton.jit
def _quantize_flat_kernel(x_ptr, q_ptr, s_ptr, total, G, stride_xm, stride_qm, stride_sm, stride_sg,
                          GROUP: tl.constexpr, PAIRS: tl.constexpr, USE_PDL: tl.constexpr = False):
    """_quantize_groups_kernel's values where K is whole groups (GROUP a power of two): program i
    takes the (token, group) pairs i * PAIRS ... in row-major order, so every program has the
    same PAIRS x GROUP tile, whatever K (6 groups a row leave none padded)."""
    gdc_enter(USE_PDL)
    p = tl.program_id(0).to(tl.int64) * PAIRS + tl.arange(0, PAIRS)
    ok = p < total
    row = p // G
    g = p % G
    lane = tl.arange(0, GROUP)[None, :]
    x = tl.load(x_ptr + (row * stride_xm + g * GROUP)[:, None] + lane, mask=ok[:, None], other=0.0).to(tl.float32)
    q, scale = e4m3_groups(x)
    tl.store(q_ptr + (row * stride_qm + g * GROUP)[:, None] + lane, q.to(q_ptr.dtype.element_ty), mask=ok[:, None])
    tl.store(s_ptr + row * stride_sm + g * stride_sg, scale, mask=ok)


def quantize_activations_fp8(x: torch.Tensor, group: int, scales_column_major: bool = False):
    """quantize_activations in one launch: X (T, K) -> Xq fp8 (T, K), xs float32 (T, ceil(K/group)),
    xs column-major (stride (1, T)) if asked, as cuBLAS's block-scaled GEMM takes it. Off the GPU,
    the torch reference (Triton's interpreter rounds to e4m3 differently from the hardware)."""
    if not x.is_cuda:
        q, xs = quantize_activations(x, group)
        return q, (xs.t().contiguous().t() if scales_column_major else xs)
    flat = switches.FLAT_QUANTIZE
    return quantize_launch(x, group, scales_column_major, flat_quantize_pays(*x.shape, group) if flat is None else flat)


# the flat kernel where a row has at most this many groups and there are at least this many rows
# (benchmarks.kernels --only quantize on an H200, sixteenth and seventeenth sessions' NOTES)
FLAT_MAX_GROUPS, FLAT_MIN_ROWS = 8, 4096


def flat_quantize_pays(t: int, k: int, group: int) -> bool:
    """Whether the flat kernel beats a program per token for T rows of K: many short rows."""
    return t >= FLAT_MIN_ROWS and -(-k // group) <= FLAT_MAX_GROUPS


def quantize_launch(x: torch.Tensor, group: int, scales_column_major: bool, flat: bool):
    """quantize_activations_fp8's kernel launch (on any device: tests run it in the interpreter).
    `flat`: _quantize_flat_kernel where K is whole groups of a power-of-two size."""
    t, k = x.shape
    g = -(-k // group)
    q = torch.empty(t, k, dtype=FP8, device=x.device)
    xs = torch.empty(g, t, dtype=torch.float32, device=x.device).t() if scales_column_major else \
        torch.empty(t, g, dtype=torch.float32, device=x.device)
    if not t:
        return q, xs
    x = x if x.stride(-1) == 1 else x.contiguous()
    if flat and k % group == 0 and group == triton.next_power_of_2(group):
        pairs = max(1, FLAT_QUANTIZE_ELEMENTS // group)
        _quantize_flat_kernel[(triton.cdiv(t * g, pairs),)](
            x, q, xs, t * g, g, x.stride(0), q.stride(0), xs.stride(0), xs.stride(1), GROUP=group, PAIRS=pairs,
            num_warps=switches.warps("quantize", 4), **pdl(x))
    else:
        groups = max(1, min(triton.next_power_of_2(g), 4096 // triton.next_power_of_2(group)))
        _quantize_groups_kernel[(t, triton.cdiv(g, groups))](
            x, q, xs, k, x.stride(0), q.stride(0), xs.stride(0), xs.stride(1),
            GROUP=group, GROUP_PAD=triton.next_power_of_2(group), GROUPS=groups,
            num_warps=switches.warps("quantize", 4), **pdl(x))
    return q, xs


# the flat kernel's tile: (token, group) pairs x group elements
FLAT_QUANTIZE_ELEMENTS = 4096

GEMV_MAX_M = 16
GEMV_CONFIG = {"BLOCK_N": 8, "BLOCK_K": 512, "num_warps": 4, "num_stages": 3}


def gemv_config_file(device_name: str, block: tuple[int, int]) -> Path:
    return device_file("fp8_gemv", device_name, f",block={block[0]}x{block[1]}")


@functools.lru_cache(maxsize=None)
def _gemv_table(device_name: str, block: tuple[int, int]) -> dict:
    """{"N,K": {"M": config}}, written by `benchmarks.kernels --only fp8gemv --write-configs`."""
    return device_table(lambda name: gemv_config_file(name, block), device_name) or {}


def gemv_config(n: int, k: int, m: int, block: tuple[int, int], device: torch.device) -> dict:
    if device.type != "cuda":
        return GEMV_CONFIG
    return nearest_m(_gemv_table(torch.cuda.get_device_name(device), tuple(block)), n, k, m, GEMV_CONFIG)


def gemv_ok(m: int, block: tuple[int, int]) -> bool:
    """The GEMV's programs take rows inside one scale block: 16 of them (or fewer, at M=1)."""
    return 0 < m <= GEMV_MAX_M and (m == 1 or block[0] % 16 == 0)


DENSE_MAX_M = 256            # rows past this (prefill) stay with cuBLAS, whatever the table's largest M


def dense_config_file(device_name: str, block: tuple[int, int]) -> Path:
    return device_file("fp8_dense", device_name, f",block={block[0]}x{block[1]}")


@functools.lru_cache(maxsize=None)
def _dense_table(device_name: str, block: tuple[int, int]) -> dict:
    """{"N,K": {"M": launch shape, or "default" where the GEMV or cuBLAS was faster}}."""
    return device_table(lambda name: dense_config_file(name, block), device_name) or {}


def dense_config(n: int, k: int, m: int, block: tuple[int, int], device: torch.device) -> dict | None:
    """The one-expert grouped GEMM's launch shape for M rows of (N, K) at the nearest tuned M, or
    None: the GEMV (M <= 16) or cuBLAS, as without the table."""
    if device.type != "cuda" or not 1 < m <= DENSE_MAX_M:
        return None
    cfg = nearest_m(_dense_table(torch.cuda.get_device_name(device), tuple(block)), n, k, m, None)
    return cfg if isinstance(cfg, dict) else None


def fp8_gemv(x: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
             bias: torch.Tensor | None = None, config: dict | None = None, norm: tuple | None = None) -> torch.Tensor | None:
    """x (M <= 16, K) in bf16/float32, Wq (N, K) fp8, S (ceil(N/bn), ceil(K/bk)) -> (M, N) in x's dtype.
    `norm` (qwen3vl_kernels.linear.norm_arguments'): x is one row before its residual add and RMSNorm, done
    in the kernel; None is returned where the launch shape asks for INT_CVT or HALF2 (their kernel
    has no norm)."""
    m, k = x.shape
    n = wq.shape[0]
    if (not gemv_ok(m, block) or wq.shape[1] != k or wq.stride(-1) != 1
            or tuple(scale.shape) != scale_grid(n, k, block)):
        raise ValueError(f"fp8_gemv: x {tuple(x.shape)}, w {tuple(wq.shape)}, scale {tuple(scale.shape)}, block {block}")
    cfg = {**gemv_config(n, k, m, block, x.device), **(config or {})}
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 1 and _row_kernel_ok(cfg, wq, block, cfg["BLOCK_K"]):
        if norm is not None:
            return None
        block_n = dividing(cfg["BLOCK_N"], block[0])
        _fp8_row_kernel[(triton.cdiv(n, block_n),)](
            x, wq, bias if bias is not None else scale, y, scale, n, k, wq.stride(0), scale.stride(0),
            HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=cfg["BLOCK_K"], BN=block[0], BK=block[1],
            GROUP_SCALE=group_scale_ok(cfg.get("GROUP_SCALE"), cfg["BLOCK_K"] // 4, block[1] // 4),
            HALF2=bool(cfg.get("HALF2")), ASM=bool(cfg.get("HALF2")) and x.is_cuda, num_warps=cfg["num_warps"],
            **pdl(x))
        return y
    m_pad = 1 if m == 1 else 16
    block_n = cfg["BLOCK_N"] if m_pad == 1 else max(16, cfg["BLOCK_N"])
    block_n = dividing(block_n, block[0])   # a program's rows share one row of scale blocks
    a8 = bool(cfg.get("A8")) and m_pad > 1 and block[1] >= 32
    block_k = block[1] if a8 else cfg["BLOCK_K"]
    group_scale = not a8 and group_scale_ok(cfg.get("GROUP_SCALE"), block_k, block[1])
    _skinny_kernel[(triton.cdiv(n, block_n),)](
        x, wq, bias if bias is not None else scale, y, scale, m, n, k, x.stride(0), wq.stride(0), y.stride(0),
        scale.stride(0), HAS_BIAS=bias is not None, M_PAD=m_pad, BLOCK_N=block_n,
        BLOCK_K=block_k, HAS_SCALE=True, BN=block[0], BK=block[1], A8=a8, GROUP_SCALE=group_scale,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **(norm_arguments(x, norm) if norm is not None else {}), **pdl(x))
    return y


@triton.jit
def _e4m3_bits_as_f32(w4, i: tl.constexpr):
    """Byte i of each int32 of w4 (four e4m3 values) as float32 times 2^-120, by integer ops: the
    sign to bit 31, exponent and mantissa to bits 20..26 (e4m3's exponent bias is 7, float32's
    127; e4m3's subnormals land on float32's)."""
    if i == 3:
        mag = (w4 >> 4) & 0x07F00000
    else:
        mag = (w4 << (20 - 8 * i)) & 0x07F00000
    return (mag | ((w4 << (24 - 8 * i)) & -2147483648)).to(tl.float32, bitcast=True)


@triton.jit
def _row_x(x_ptr, s_row, k, K4, offs_j, j_ok, i: tl.constexpr, factor: tl.constexpr, Q: tl.constexpr,
           BLOCK_K: tl.constexpr, BK: tl.constexpr, GROUP_SCALE: tl.constexpr):
    """Columns 4j + i of K step k of the row x (float32), times their scale blocks' scales and
    `factor`."""
    xi = tl.load(x_ptr + k * BLOCK_K + offs_j * 4 + i, mask=j_ok, other=0.0).to(tl.float32)
    if GROUP_SCALE:
        xi = block_scaled(xi * factor, s_row, k, K4, Q, BK // 4, 0)
    else:
        xi = xi * (tl.load(s_row + (k * BLOCK_K + offs_j * 4) // BK, mask=j_ok, other=0.0) * factor)
    return xi


@triton.jit
def _row_int_cvt(x_ptr, w_ptrs, w4, s_row, n_ok, K, K4, offs_j, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 BK: tl.constexpr, GROUP_SCALE: tl.constexpr):
    """The row's products, the weights made float32 by integer ops (`_e4m3_bits_as_f32`), w4 the
    first K step's weights (w_ptrs' ints): float32 (BLOCK_N,)."""
    Q: tl.constexpr = BLOCK_K // 4
    acc = tl.zeros((BLOCK_N, Q), tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        j_ok = offs_j < K4 - k * Q
        for i in tl.static_range(4):
            xi = _row_x(x_ptr, s_row, k, K4, offs_j, j_ok, i, 1.2676506002282294e30, Q, BLOCK_K, BK, GROUP_SCALE)
            acc += _e4m3_bits_as_f32(w4, i) * xi[None, :]
        w_ptrs += Q
        w4 = tl.load(w_ptrs, mask=n_ok[:, None] & (offs_j < K4 - (k + 1) * Q)[None, :], other=0)
    return tl.sum(acc, 1) * 1048576.0


# HALF2's PTX (one int32 of the weights: four e4m3 bytes). $2: the weights, $3/$4: x's columns
# 4j, 4j+1 / 4j+2, 4j+3 as f16x2, $5/$6 the accumulators (f16x2) -> $0/$1. The conversion is one
# instruction per two weights; the multiply-add one per two.
_E4M3X2_FMA = tl.constexpr("""{ .reg .b16 lo, hi; .reg .b32 a, b;
 mov.b32 {lo, hi}, $2;
 cvt.rn.f16x2.e4m3x2 a, lo;
 cvt.rn.f16x2.e4m3x2 b, hi;
 fma.rn.f16x2 $0, a, $3, $5;
 fma.rn.f16x2 $1, b, $4, $6; }""")
# the two accumulators' four halves summed ($1 + $2 in f16x2, then its halves in float32)
_F16X2_SUM = tl.constexpr("""{ .reg .b16 lo, hi; .reg .b32 s; .reg .f32 a, b;
 add.rn.f16x2 s, $1, $2;
 mov.b32 {lo, hi}, s;
 cvt.f32.f16 a, lo;
 cvt.f32.f16 b, hi;
 add.f32 $0, a, b; }""")


@triton.jit
def _f16_half(v, HI: tl.constexpr):
    """The low (or high) 16 bits of the int32 v as float16."""
    if HI:
        v = v >> 16
    return (v & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _f16x2(lo, hi):
    """float16 pairs packed into an int32 (lo in the low half), as the PTX above takes them."""
    return (lo.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | \
        (hi.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) << 16)


@triton.jit
def _e4m3_as_f16(w4, i: tl.constexpr):
    """Byte i of each int32 of w4 as float16, exactly (e4m3 is a subset of float16: its sign,
    exponent and mantissa moved into place give the value times 2^-8)."""
    b = (w4 >> (8 * i)) & 0xFF
    return (((b & 0x80) << 8) | ((b & 0x7F) << 7)).to(tl.int16).to(tl.float16, bitcast=True) * 256.0


# four e4m3 bytes ($2) -> four bfloat16 (two bf16x2, $0 and $1) with the e4m3 exponent field read
# as bfloat16's: each value times 2^-120 (bias 7 against 127; a subnormal stays one, scaled the
# same). prmt puts bytes 0 and 1 (2 and 3) in the high byte of each half; the sign stays at bit
# 15 of its half, exponent and mantissa move down 4 bits: (t >> 4) & 0x07F0 | t & 0x8000 a half.
_E4M3X4_BF16_BITS = tl.constexpr("""{ .reg .b32 lo, hi, slo, shi;
 prmt.b32 lo, $2, 0, 0x1404;
 prmt.b32 hi, $2, 0, 0x3424;
 and.b32 slo, lo, 0x80008000;
 and.b32 shi, hi, 0x80008000;
 shr.u32 lo, lo, 4;
 shr.u32 hi, hi, 4;
 lop3.b32 $0, lo, 0x07F007F0, slo, 0xEA;
 lop3.b32 $1, hi, 0x07F007F0, shi, 0xEA; }""")
E4M3_BITS_SCALE = tl.constexpr(2.0 ** 60)      # _e4m3_bf16_bits' 2^-120 is undone as (scale * 2^60) * 2^60


@triton.jit
def _e4m3_bf16_bits(w):
    """e4m3 tensor -> bfloat16 of each value times 2^-120, by _E4M3X4_BF16_BITS's PTX (the GPU):
    two integer instructions a weight, where .to(bfloat16) takes an F2FP and an F2F a weight on
    sm_90. e4m3's NaN codes (0x7F, 0xFF) become finite numbers: weights never hold them."""
    return tl.inline_asm_elementwise(_E4M3X4_BF16_BITS, "=r,=r,r", [w.to(tl.uint8, bitcast=True)],
                                     dtype=tl.bfloat16, is_pure=True, pack=4)


@triton.jit
def _e4m3x2_fma(w4, x01, x23, acc01, acc23, ASM: tl.constexpr):
    """_E4M3X2_FMA on the GPU; off it (the interpreter runs no PTX) the same arithmetic in float16
    (with two roundings for the fused one)."""
    if ASM:
        acc01, acc23 = tl.inline_asm_elementwise(_E4M3X2_FMA, "=r,=r,r,r,r,r,r", [w4, x01, x23, acc01, acc23],
                                                 dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
    else:
        acc01 = _f16x2(tl.fma(_e4m3_as_f16(w4, 0), _f16_half(x01, False), _f16_half(acc01, False)),
                       tl.fma(_e4m3_as_f16(w4, 1), _f16_half(x01, True), _f16_half(acc01, True)))
        acc23 = _f16x2(tl.fma(_e4m3_as_f16(w4, 2), _f16_half(x23, False), _f16_half(acc23, False)),
                       tl.fma(_e4m3_as_f16(w4, 3), _f16_half(x23, True), _f16_half(acc23, True)))
    return acc01, acc23


@triton.jit
def _f16x2_sum(acc01, acc23, ASM: tl.constexpr):
    if ASM:
        out = tl.inline_asm_elementwise(_F16X2_SUM, "=r,r,r", [acc01, acc23], dtype=tl.float32, is_pure=True, pack=1)
    else:
        out = ((_f16_half(acc01, False) + _f16_half(acc23, False)).to(tl.float32)
               + (_f16_half(acc01, True) + _f16_half(acc23, True)).to(tl.float32))
    return out


@triton.jit
def _row_half2(x_ptr, w_ptrs, w4, s_row, n_ok, K, K4, offs_j, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               BK: tl.constexpr, GROUP_SCALE: tl.constexpr, ASM: tl.constexpr):
    """The row's products in float16 pairs (HALF2): x's columns times their scales and 2^8, the
    weights as they are (e4m3 values are float16 values), a K step's products added into f16x2
    accumulators. float32 (BLOCK_N,); not finite where a float16 overflowed."""
    Q: tl.constexpr = BLOCK_K // 4
    acc01 = tl.zeros((BLOCK_N, Q), tl.int32)
    acc23 = tl.zeros((BLOCK_N, Q), tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        j_ok = offs_j < K4 - k * Q
        x0 = _row_x(x_ptr, s_row, k, K4, offs_j, j_ok, 0, 256.0, Q, BLOCK_K, BK, GROUP_SCALE)
        x1 = _row_x(x_ptr, s_row, k, K4, offs_j, j_ok, 1, 256.0, Q, BLOCK_K, BK, GROUP_SCALE)
        x2 = _row_x(x_ptr, s_row, k, K4, offs_j, j_ok, 2, 256.0, Q, BLOCK_K, BK, GROUP_SCALE)
        x3 = _row_x(x_ptr, s_row, k, K4, offs_j, j_ok, 3, 256.0, Q, BLOCK_K, BK, GROUP_SCALE)
        acc01, acc23 = _e4m3x2_fma(w4, _f16x2(x0, x1)[None, :], _f16x2(x2, x3)[None, :], acc01, acc23, ASM)
        w_ptrs += Q
        w4 = tl.load(w_ptrs, mask=n_ok[:, None] & (offs_j < K4 - (k + 1) * Q)[None, :], other=0)
    return tl.sum(_f16x2_sum(acc01, acc23, ASM), 1) * 0.00390625


@triton.jit
def _fp8_row_kernel(x_ptr, w_ptr, b_ptr, y_ptr, s_ptr, N, K, stride_wn, stride_sn, HAS_BIAS: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    GROUP_SCALE: tl.constexpr = False, HALF2: tl.constexpr = False, ASM: tl.constexpr = False,
                    USE_PDL: tl.constexpr = False):
    """y = x W^T for one row x and fp8 W, BLOCK_N rows of W a program, its bytes read four to an
    int32. Two ways to make them numbers:
    - INT_CVT (`_row_int_cvt`): float32 by integer ops (`_e4m3_bits_as_f32`). The hardware's
      conversion, the skinny kernel's path (e4m3x2 -> f16x2 -> f32: 1.5 conversions an element,
      on a unit of 16 lanes an SM), would cap an H200 near 2.8 TB/s of fp8 by that count. The
      weights come out 2^-120 too small: x's columns are scaled by 2^100 and the sum by 2^20 (no
      subnormal products). Four to six integer instructions an element.
    - HALF2 (`_row_half2`, ASM: its PTX; off the GPU, the interpreter's emulation): two weights
      made f16x2 by one conversion, multiplied and added two at a time in float16. About one
      instruction an element, where the integer ops' count made the kernel ALU-bound: 30B-A3B's
      o_proj at one row 5.4 -> 4.2 us alone on an H200 (qkv 5.9 -> 4.4), the row's error that of
      the bf16 output's rounding. A float16 that overflowed (a product of ~256 in x * W's units, far past a
      normalised row's) leaves the program's sums not finite, and the program computes them again
      by INT_CVT.
    A step's columns are taken in the order 4j + i (byte i of int j), and x is read in the same
    order."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    Q: tl.constexpr = BLOCK_K // 4
    K4 = K // 4
    offs_j = tl.arange(0, Q)
    w_ptrs = w_ptr.to(tl.pointer_type(tl.int32)) + offs_n[:, None].to(tl.int64) * (stride_wn // 4) + offs_j[None, :]
    s_row = s_ptr + ((pid * BLOCK_N) // BN) * stride_sn
    gdc_launch(USE_PDL)
    w4 = tl.load(w_ptrs, mask=n_ok[:, None] & (offs_j < K4)[None, :], other=0)
    gdc_wait(USE_PDL)
    if HALF2:
        y = _row_half2(x_ptr, w_ptrs, w4, s_row, n_ok, K, K4, offs_j, BLOCK_N, BLOCK_K, BK, GROUP_SCALE, ASM)
        if tl.max(((tl.abs(y) == float("inf")) | (y != y)).to(tl.int32), 0) > 0:   # a float16 overflowed
            w4 = tl.load(w_ptrs, mask=n_ok[:, None] & (offs_j < K4)[None, :], other=0)
            y = _row_int_cvt(x_ptr, w_ptrs, w4, s_row, n_ok, K, K4, offs_j, BLOCK_N, BLOCK_K, BK, GROUP_SCALE)
    else:
        y = _row_int_cvt(x_ptr, w_ptrs, w4, s_row, n_ok, K, K4, offs_j, BLOCK_N, BLOCK_K, BK, GROUP_SCALE)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, y.to(y_ptr.dtype.element_ty), mask=n_ok)


def _row_kernel_ok(cfg: dict, wq: torch.Tensor, block: tuple[int, int], block_k: int) -> bool:
    """The row kernel (INT_CVT or HALF2) reads w four bytes at a time: rows and the base
    4-aligned, K steps and scale blocks whole ints."""
    return ((bool(cfg.get("INT_CVT")) or bool(cfg.get("HALF2"))) and wq.shape[1] % 4 == 0
            and wq.stride(0) % 4 == 0 and wq.data_ptr() % 4 == 0 and block_k % 4 == 0 and block[1] % 4 == 0)


def group_scale_ok(asked, block_k: int, bk: int) -> bool:
    """GROUP_SCALE (a K step's scales loaded once per scale block, qwen3vl_kernels.linear.block_scaled)
    where a launch shape asks for it and the step and the block are both powers of two, so that
    one is whole blocks of the other or lies inside one."""
    return bool(asked) and all(v > 0 and v & (v - 1) == 0 for v in (block_k, bk))


def fp8_linear(x: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """The GPU's fp8 linear layer: the GEMV kernel or the dense grouped GEMM for decode rows (the
    device's tables choose), cuBLAS fp8 for prefill."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    y = None
    dense = dense_config(wq.shape[0], wq.shape[1], x2.shape[0], block, x2.device)
    if dense is not None:
        from .fused_moe import dense_fp8_gemm          # fused_moe imports this module
        y = dense_fp8_gemm(x2, wq, scale, block, dense)
        y = y if bias is None else y + bias
    elif gemv_ok(x2.shape[0], block):
        y = fp8_gemv(x2, wq, scale, block, bias)
    elif _blockwise_ok(x2, wq, block):
        y = _scaled_mm_blockwise(x2, wq, scale, bias)
    if y is None:
        y = F.linear(x2, dequantize_weight_blocks(wq, scale, block, x.dtype), bias)
    return y.reshape(*shape[:-1], wq.shape[0])


_UNSUPPORTED: set[tuple[int, int, int]] = set()     # (M, N, K) cuBLAS refused: not asked again


def _blockwise_ok(x, wq, block) -> bool:
    return (x.is_cuda and block == (128, 128) and wq.shape[0] % 128 == 0 and wq.shape[1] % 128 == 0
            and (x.shape[0], *wq.shape) not in _UNSUPPORTED and _scaled_mm_api() is not None)


@functools.lru_cache(maxsize=None)
def _scaled_mm_api():
    fn, kinds = getattr(F, "scaled_mm", None), getattr(F, "ScalingType", None)
    if fn is None or kinds is None:
        log.warning("torch has no block-scaled fp8 GEMM here: fp8 prefill runs as a bf16 matmul")
        return None
    return fn, kinds


def _scaled_mm_blockwise(x, wq, scale, bias):
    """None where cuBLAS has no algorithm for the shape (the caller then dequantizes)."""
    fn, kinds = _scaled_mm_api()
    t, k = x.shape
    pad = -t % 16                   # cuBLAS has no algorithm for some row counts (954, 69 on an H200)
    if pad:
        x = torch.cat([x, x.new_zeros(pad, k)])
    xq, xs = quantize_activations_fp8(x, 128, scales_column_major=True)
    try:
        y = fn(xq, wq.T, xs, kinds.BlockWise1x128, scale.T, kinds.BlockWise128x128,
               output_dtype=x.dtype if x.dtype != torch.float32 else torch.bfloat16)[:t]
    except (RuntimeError, ValueError) as e:       # e.g. CUBLAS_STATUS_NOT_SUPPORTED
        _UNSUPPORTED.add((t, *wq.shape))
        log.warning("cuBLAS block fp8 GEMM refused M=%d N=%d K=%d (%s); dequantizing for it", t, *wq.shape,
                    str(e).splitlines()[0][:120])
        return None
    y = y.to(x.dtype)
    return y if bias is None else y + bias
