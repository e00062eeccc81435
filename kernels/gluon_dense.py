"""A decode batch's block-fp8 projection (1-64 rows) in Gluon, Triton's explicit language for
Hopper, so that each K step's tensor-core product overlaps the scaling of the step before.

Why not Triton-lang: a block-scaled GEMM multiplies each 128-wide K step's product by that block's
scales before adding it up. Triton 3.6 waits for every `tl.dot` to finish before the next is
issued (`warp_group_dot_wait {pendings = 0}` after each, whatever the loop's shape), so at 16-64
rows one warpgroup an SM idles on every step (NOTES, thirty-fourth and thirty-fifth sessions: the
dense 16/64-row GEMMs at ~0.3 of their bytes' time, and Triton's automatic warp specialization
failing them). Gluon exposes wgmma's asynchrony: step i's product is issued, then step i-1's is
waited for (one left in flight), scaled and added, and its weight stage refilled by TMA. The
steps are unrolled: a product carried across a loop's back edge is copied out of its registers
while in flight, and ptxas then serializes every wgmma (C7514).

The launch: the weight rows are the wgmma's M side (BLOCK_N of them, 64 or 128, inside one
weight-scale block), the batch's rows its N side (BLOCK_T: 16 or 32; 64 rows are two programs),
K in 128-wide steps (one scale block each). A program quantizes its rows itself, per row and
128-wide group, into shared memory, for all its K steps (the same bits as kernels.fp8's quantize
launch, one launch fewer), while a STAGES-deep ring of weight tiles, asked for before PDL's wait
(nothing writes them), lands. SPLIT_K: program_id(2) takes STEPS of the K steps and stores its
float32 partial; the tile's last program (an atomic count, reset by it) sums the partials in
split order, so the bits do not depend on which split finished first (as kernels.fused_moe's
split-K launches).

GPU only (sm_90): Triton's interpreter runs no Gluon. CPU tests compile it for sm_90 and check the
overlap in its PTX and ptxas's report (tests/test_gluon_dense.py); GPU tests check it against the
same quantization in torch.
"""

from __future__ import annotations

import functools

import torch
import triton

try:        # Gluon and its Hopper API (Triton 3.5+); without them, fused_moe's launches run
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                   warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:         # pragma: no cover - an older Triton
    gluon = None

MAX_ROWS = 64               # the batch's rows are one wgmma N side: past this, the grouped GEMM


def available() -> bool:
    return gluon is not None


if gluon is not None:
    @gluon.jit
    def _pdl(USE_PDL: gl.constexpr, WAIT: gl.constexpr):
        """griddepcontrol: WAIT, until the kernel before has finished and its writes are visible;
        else let the next kernel's programs launch."""
        if USE_PDL:
            if WAIT:
                gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False,
                                          pack=1)
            else:
                gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32,
                                          is_pure=False, pack=1)

    @gluon.jit
    def _quantize_rows(x_ptr, stride_x, a_s, sa_s, off_t, k0, M, K, BLOCK_T: gl.constexpr, STEPS: gl.constexpr,
                       num_warps: gl.constexpr):
        """The program's rows of x (bfloat16), K steps k0 .. k0 + STEPS - 1, quantized per row and
        128-wide group as kernels.fp8's quantize launches do (kernels.linear.e4m3_groups: the same
        bits), into shared memory: a_s[i] the e4m3 tile of step i, sa_s[i] its rows' scales."""
        xl: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[2, 16],
                                            warps_per_cta=[num_warps, 1], order=[1, 0])
        offs_r = off_t + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, xl))
        offs_c = gl.arange(0, 128, layout=gl.SliceLayout(0, xl))
        base = x_ptr + offs_r[:, None] * stride_x + offs_c[None, :]
        for i in gl.static_range(STEPS):
            col = (k0 + i) * 128 + offs_c
            x = gl.load(base + (k0 + i) * 128, mask=(offs_r < M)[:, None] & (col < K)[None, :], other=0.0)
            x = x.to(gl.float32)
            scale = gl.maximum(gl.max(gl.abs(x), 1), 1e-12) / 448.0
            q = gl.minimum(gl.maximum(x / scale[:, None], -448.0), 448.0)
            a_s.index(i).store(q.to(gl.float8e4nv))
            sa_s.index(i).store(scale)

    @gluon.jit
    def _issue(w_s, a_s, bars, zero, i: gl.constexpr, STAGES: gl.constexpr):
        """Step i's product, issued once its weight tile has landed; not waited for."""
        mbarrier.wait(bars.index(i % STAGES), (i // STAGES) & 1)
        return warpgroup_mma(w_s.index(i % STAGES), a_s.index(i).permute((1, 0)), zero, use_acc=False, is_async=True)

    @gluon.jit
    def _retire(acc, product, s, w_desc, w_s, bars, i: gl.constexpr, off_n, k0, BLOCK_K: gl.constexpr,
                STAGES: gl.constexpr, STEPS: gl.constexpr):
        """Step i's product (the one issued after it still running) scaled into acc; its stage then
        takes step i + STAGES's weight tile."""
        acc = acc + warpgroup_mma_wait(num_outstanding=1, deps=(product, )) * s[None, :]
        if i + STAGES < STEPS:
            _load(w_desc, w_s, bars, i + STAGES, off_n, k0, BLOCK_K, STAGES)
        return acc

    @gluon.jit
    def _load(w_desc, w_s, bars, i: gl.constexpr, off_n, k0, BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
        """Step i's weight tile into its stage (TMA; zeros past K)."""
        mbarrier.expect(bars.index(i % STAGES), w_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(w_desc, [off_n, (k0 + i) * BLOCK_K], bars.index(i % STAGES),
                                        w_s.index(i % STAGES))

    @gluon.jit
    def _w8a8_kernel(w_desc, x_ptr, sw_ptr, y_ptr, ws_ptr, count_ptr, M, N, K, stride_x, stride_sw, stride_y,
                     BLOCK_N: gl.constexpr, BLOCK_T: gl.constexpr, BLOCK_K: gl.constexpr, SCALE_N: gl.constexpr,
                     STAGES: gl.constexpr, STEPS: gl.constexpr, SPLIT_K: gl.constexpr, USE_PDL: gl.constexpr,
                     num_warps: gl.constexpr):
        """y (M, N) = x (M, K) x w (N, K)^T, x quantized here per (row, 128-wide K group) to e4m3,
        w e4m3 with a float32 scale per (SCALE_N rows, K block) in sw; float32 products and sums.
        Split s takes K steps s * STEPS .. (s + 1) * STEPS - 1 (those past K: TMA's zeros and x's
        masked zeros)."""
        pid_t = gl.program_id(0)            # the batch's rows, BLOCK_T a program, fastest: the tiles of one
        pid_n = gl.program_id(1)            # weight tile run side by side and share its reads in L2
        split = gl.program_id(2)
        off_n = pid_n * BLOCK_N
        off_t = pid_t * BLOCK_T
        k0 = split * STEPS

        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK_T, 32])
        cols: gl.constexpr = gl.SliceLayout(0, mma)
        rows: gl.constexpr = gl.SliceLayout(1, mma)
        a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_T, BLOCK_K], gl.float8e4nv)
        w_s = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
        a_s = gl.allocate_shared_memory(gl.float8e4nv, [STEPS, BLOCK_T, BLOCK_K], a_layout)
        sa_s = gl.allocate_shared_memory(gl.float32, [STEPS, BLOCK_T],
                                         gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0]))
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)

        _pdl(USE_PDL, False)
        # the weights first (no kernel writes them: before PDL's wait), then the rows, quantized
        for i in gl.static_range(min(STAGES, STEPS)):
            _load(w_desc, w_s, bars, i, off_n, k0, BLOCK_K, STAGES)
        _pdl(USE_PDL, True)
        _quantize_rows(x_ptr, stride_x, a_s, sa_s, off_t, k0, M, K, BLOCK_T, STEPS, num_warps)
        fence_async_shared()                # the stores above, seen by the wgmmas' reads
        gl.thread_barrier()

        offs_t = off_t + gl.arange(0, BLOCK_T, layout=cols)
        t_ok = offs_t < M
        sw_row = sw_ptr + (off_n // SCALE_N) * stride_sw
        steps = gl.cdiv(K, BLOCK_K)
        acc = gl.zeros([BLOCK_N, BLOCK_T], gl.float32, mma)
        zero = gl.zeros([BLOCK_N, BLOCK_T], gl.float32, mma)     # use_acc=False: its value is not read

        # The K steps unrolled (STEPS a program): a product in flight across a loop's back edge is
        # copied out of its registers before its wait, and ptxas then serializes every wgmma.
        prev = _issue(w_s, a_s, bars, zero, 0, STAGES)
        s_prev = gl.load(sw_row + k0, mask=k0 < steps, other=0.0) * sa_s.index(0).load(cols)
        for i in gl.static_range(1, STEPS):
            cur = _issue(w_s, a_s, bars, zero, i, STAGES)
            s_now = gl.load(sw_row + k0 + i, mask=k0 + i < steps, other=0.0) * sa_s.index(i).load(cols)
            acc = _retire(acc, prev, s_prev, w_desc, w_s, bars, i - 1, off_n, k0, BLOCK_K, STAGES, STEPS)
            prev = cur
            s_prev = s_now
        acc = acc + warpgroup_mma_wait(num_outstanding=0, deps=(prev, )) * s_prev[None, :]
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))

        offs_n = off_n + gl.arange(0, BLOCK_N, layout=rows)
        mask = (offs_n < N)[:, None] & t_ok[None, :]
        if SPLIT_K == 1:
            gl.store(y_ptr + offs_t[None, :] * stride_y + offs_n[:, None], acc.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            part = offs_t[None, :] * N + offs_n[:, None]
            gl.store(ws_ptr + split * M * N + part, acc, mask=mask)
            gl.thread_barrier()          # every thread's partial stored before the count releases it
            tile = pid_n * gl.num_programs(0) + pid_t
            if gl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
                total = gl.zeros([BLOCK_N, BLOCK_T], gl.float32, mma)
                for j in range(0, SPLIT_K):
                    total += gl.load(ws_ptr + j * M * N + part, mask=mask, other=0.0, volatile=True)
                gl.store(y_ptr + offs_t[None, :] * stride_y + offs_n[:, None], total.to(y_ptr.dtype.element_ty),
                         mask=mask)
                gl.atomic_xchg(count_ptr + tile, 0)


def block_t(m: int) -> int:
    """The wgmma N side for m rows: 16 or 32 (fewer compiled shapes than multiples of 8); 64 rows are
    two programs of 32 (at 64 a program needed 242-255 registers and spilled; 32 take 120)."""
    return min(32, max(16, triton.next_power_of_2(m)))


def launch_ok(m: int, n: int, k: int, block: tuple[int, int], block_n: int) -> bool:
    """Shapes the kernel takes: 1-64 rows, 128-wide K blocks, BLOCK_N rows inside one scale block,
    rows of K bytes that TMA can stride (16-byte multiples)."""
    return (gluon is not None and 0 < m <= MAX_ROWS and block[1] == 128 and block_n in (64, 128)
            and block[0] % block_n == 0 and k % 16 == 0)


SHARED_BYTES = 220 * 1024       # an H100's and H200's 227 KB a block, less the barriers and the split's broadcast


def shared_bytes(m: int, k: int, cfg: dict) -> int:
    """What a launch keeps in shared memory: its quantized rows for all its K steps, and its ring of
    weight tiles, with their scales and barriers."""
    steps, _ = steps_split(k, cfg.get("SPLIT_K", 1))
    stages = min(cfg.get("num_stages", 4), steps)
    return steps * block_t(m) * (128 + 4) + stages * (cfg["BLOCK_N"] * 128 + 8)


def fits(m: int, k: int, cfg: dict) -> bool:
    return shared_bytes(m, k, cfg) <= SHARED_BYTES


@functools.lru_cache(maxsize=None)
def w_layout(block_n: int):
    return gl.NVMMASharedLayout.get_default_for([block_n, 128], gl.float8e4nv)


def steps_split(k: int, split: int) -> tuple[int, int]:
    """(STEPS, SPLIT_K) as launched: K's 128-wide steps shared by at most `split` programs, each
    STEPS of them, and no program without a step of its own."""
    steps = triton.cdiv(k, 128)
    per = triton.cdiv(steps, max(1, min(split, steps)))
    return per, triton.cdiv(steps, per)


def w8a8(x: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], y: torch.Tensor,
         cfg: dict, ws_counts: tuple | None, pdl_kw: dict) -> torch.Tensor:
    """y (M, N) = x (M, K) bfloat16, quantized per row and 128-wide group in the kernel, times wq (N, K)
    fp8 with `scale` (ceil(N/bn), K/128). cfg: BLOCK_N, num_stages (weight tiles in flight),
    num_warps, SPLIT_K; ws_counts (SPLIT_K > 1): the float32 workspace (SPLIT_K, M, N) and the
    per-tile counts."""
    m, k = x.shape
    n = wq.shape[0]
    block_n = cfg["BLOCK_N"]
    bt = block_t(m)
    w_desc = TensorDescriptor(wq, [n, k], [wq.stride(0), 1], [block_n, 128], w_layout(block_n))
    steps, split = steps_split(k, cfg.get("SPLIT_K", 1) if ws_counts is not None else 1)
    ws, counts = ws_counts if ws_counts is not None else (y, y)
    _w8a8_kernel[(triton.cdiv(m, bt), triton.cdiv(n, block_n), split)](
        w_desc, x, scale, y, ws, counts, m, n, k, x.stride(0), scale.stride(0), y.stride(0),
        BLOCK_N=block_n, BLOCK_T=bt, BLOCK_K=128, SCALE_N=block[0], STAGES=min(cfg.get("num_stages", 4), steps),
        STEPS=steps, SPLIT_K=split, USE_PDL=bool(pdl_kw), num_warps=cfg.get("num_warps", 4),
        **({"launch_pdl": True} if pdl_kw else {}))
    return y
