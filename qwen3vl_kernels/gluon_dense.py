"""A decode batch's block-fp8 projection (W8A8, 1-64 rows) in Gluon, Triton's explicit language for
Hopper, so that each K step's tensor-core product overlaps the scaling of the step before.

Why not Triton-lang: a block-scaled GEMM multiplies each 128-wide K step's product by that block's
scales before adding it up. Triton 3.6 waits for every `tl.dot` to finish before the next is
issued (`warp_group_dot_wait {pendings = 0}` after each, whatever the loop's shape), so at 16-64
rows one warpgroup an SM idles on every step (NOTES, thirty-fourth and thirty-fifth sessions: the
dense 16/64-row GEMMs at ~0.3 of their bytes' time, and Triton's automatic warp specialization
failing them). Gluon exposes wgmma's asynchrony: step i's product is issued, then step i-1's is
waited for (one left in flight), scaled and added, and its shared-memory stage refilled by TMA.
The steps are unrolled: a product carried across a loop's back edge is copied out of its
registers while in flight, and ptxas then serializes every wgmma (its C7514).

The launch: the weight rows are the wgmma's M side (BLOCK_N of them, 64 or 128, inside one
weight-scale block), the batch's rows its N side (BLOCK_T: 16 or 32; 64 rows are two programs:
at 64 a program spilled), K in 128-wide steps (one scale block each); a STAGES-deep ring of TMA
loads with an mbarrier a stage. The rows come quantized by qwen3vl_kernels.fp8's launch before it.
Quantized in the kernel they were slower on the H200, whether all of a program's K steps before
its first product (01f27f1) or a step at a time while the step before is multiplied (f2d9306's
ROWS, 2-5x slower; NOTES, thirty-sixth and thirty-seventh sessions). PDL: the weight tiles are
asked for before the wait for the kernel before (nothing writes them), the activations after.
SPLIT_K: program_id(2) takes STEPS of the K steps and stores its float32 partial; the tile's
last program (an atomic count, reset by it) sums the partials in split order, so the bits do not
depend on which split finished first (as qwen3vl_kernels.fused_moe's split-K launches).

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
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
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
    def _scales(sw_row, sa_rows, t_ok, kb, steps):
        """Step kb's scales, weight block times each row's (0 past K's last block: its tiles are
        TMA's zero fill)."""
        inside = kb < steps
        return gl.load(sw_row + kb, mask=inside, other=0.0) * gl.load(sa_rows + kb, mask=t_ok & inside, other=0.0)

    @gluon.jit
    def _issue(w_s, a_s, bars, zero, i: gl.constexpr, STAGES: gl.constexpr):
        """Step i's product, issued once its stage has landed; not waited for."""
        mbarrier.wait(bars.index(i % STAGES), (i // STAGES) & 1)
        return warpgroup_mma(w_s.index(i % STAGES), a_s.index(i % STAGES).permute((1, 0)), zero, use_acc=False,
                             is_async=True)

    @gluon.jit
    def _retire(acc, product, s, w_desc, a_desc, w_s, a_s, bars, i: gl.constexpr, off_n, off_t, k0,
                stage_bytes: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, STEPS: gl.constexpr):
        """Step i's product (the one issued after it still running) scaled into acc; its stage then
        takes step i + STAGES's tiles."""
        acc = acc + warpgroup_mma_wait(num_outstanding=1, deps=(product, )) * s[None, :]
        if i + STAGES < STEPS:
            _load(w_desc, a_desc, w_s, a_s, bars, i + STAGES, off_n, off_t, k0, stage_bytes, BLOCK_K, STAGES)
        return acc

    @gluon.jit
    def _load(w_desc, a_desc, w_s, a_s, bars, i: gl.constexpr, off_n, off_t, k0, stage_bytes: gl.constexpr,
              BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
        """Step i's weight and activation tiles into its stage (TMA; zeros past K)."""
        mbarrier.expect(bars.index(i % STAGES), stage_bytes)
        tma.async_copy_global_to_shared(w_desc, [off_n, (k0 + i) * BLOCK_K], bars.index(i % STAGES),
                                        w_s.index(i % STAGES))
        tma.async_copy_global_to_shared(a_desc, [off_t, (k0 + i) * BLOCK_K], bars.index(i % STAGES),
                                        a_s.index(i % STAGES))

    @gluon.jit
    def _w8a8_kernel(w_desc, a_desc, sw_ptr, sa_ptr, y_ptr, ws_ptr, count_ptr, M, N, K, stride_sw, stride_sa,
                     stride_y, BLOCK_N: gl.constexpr, BLOCK_T: gl.constexpr, BLOCK_K: gl.constexpr,
                     SCALE_N: gl.constexpr, STAGES: gl.constexpr, STEPS: gl.constexpr, SPLIT_K: gl.constexpr,
                     USE_PDL: gl.constexpr, num_warps: gl.constexpr):
        """y (M, N) = a (M, K) fp8 x w (N, K) fp8^T, each (row, K block) of a scaled by sa (M, K/128)
        and each (SCALE_N rows, K block) of w by sw; float32 products and sums. Split s takes K steps
        s * STEPS .. (s + 1) * STEPS - 1 (those past K read TMA's zeros, scaled by 0)."""
        pid_t = gl.program_id(0)            # the batch's rows, BLOCK_T a program, fastest: the tiles of one
        pid_n = gl.program_id(1)            # weight tile run side by side and share its reads in L2
        split = gl.program_id(2)
        off_n = pid_n * BLOCK_N
        off_t = pid_t * BLOCK_T
        steps = gl.cdiv(K, BLOCK_K)
        k0 = split * STEPS

        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK_T, 32])
        cols: gl.constexpr = gl.SliceLayout(0, mma)
        w_s = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
        a_s = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_T, BLOCK_K], a_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        stage_bytes: gl.constexpr = w_desc.block_type.nbytes + a_desc.block_type.nbytes

        _pdl(USE_PDL, False)
        # the weights first: no kernel writes them, so before PDL's wait
        for i in gl.static_range(min(STAGES, STEPS)):
            mbarrier.expect(bars.index(i), stage_bytes)
            tma.async_copy_global_to_shared(w_desc, [off_n, (k0 + i) * BLOCK_K], bars.index(i), w_s.index(i))
        _pdl(USE_PDL, True)
        for i in gl.static_range(min(STAGES, STEPS)):
            tma.async_copy_global_to_shared(a_desc, [off_t, (k0 + i) * BLOCK_K], bars.index(i), a_s.index(i))

        offs_t = off_t + gl.arange(0, BLOCK_T, layout=cols)
        t_ok = offs_t < M
        sw_row = sw_ptr + (off_n // SCALE_N) * stride_sw
        sa_rows = sa_ptr + offs_t * stride_sa
        acc = gl.zeros([BLOCK_N, BLOCK_T], gl.float32, mma)
        zero = gl.zeros([BLOCK_N, BLOCK_T], gl.float32, mma)     # use_acc=False: its value is not read

        # The K steps unrolled (STEPS a program): a product in flight across a loop's back edge is
        # copied out of its registers before its wait, and ptxas then serializes every wgmma. A
        # step's scales are loaded once its tiles have landed (loaded earlier, every step's were
        # hoisted to the top and spilled), a step before they are used.
        prev = _issue(w_s, a_s, bars, zero, 0, STAGES)
        s_prev = _scales(sw_row, sa_rows, t_ok, k0, steps)
        for i in gl.static_range(1, STEPS):
            cur = _issue(w_s, a_s, bars, zero, i, STAGES)
            s_now = _scales(sw_row, sa_rows, t_ok, k0 + i, steps)
            acc = _retire(acc, prev, s_prev, w_desc, a_desc, w_s, a_s, bars, i - 1, off_n, off_t, k0, stage_bytes,
                          BLOCK_K, STAGES, STEPS)
            prev = cur
            s_prev = s_now
        acc = acc + warpgroup_mma_wait(num_outstanding=0, deps=(prev, )) * s_prev[None, :]
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))

        # the tile's float32 sums into y (its transpose: acc is weight rows x batch rows); split over
        # K, the partial into ws and, by the tile's last program, every split's summed in split order
        offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
        mask = (offs_n < N)[:, None] & t_ok[None, :]
        out = y_ptr + offs_t[None, :] * stride_y + offs_n[:, None]
        if SPLIT_K == 1:
            gl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            part = offs_t[None, :] * N + offs_n[:, None]
            gl.store(ws_ptr + split * M * N + part, acc, mask=mask)
            gl.thread_barrier()          # every thread's partial stored before the count releases it
            tile = pid_n * gl.num_programs(0) + pid_t
            if gl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
                total = gl.zeros([BLOCK_N, BLOCK_T], gl.float32, mma)
                for j in range(0, SPLIT_K):
                    total += gl.load(ws_ptr + j * M * N + part, mask=mask, other=0.0, volatile=True)
                gl.store(out, total.to(y_ptr.dtype.element_ty), mask=mask)
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


SHARED_BYTES = 220 * 1024       # an H100's and H200's 227 KB a block, less what the compiler adds


def shared_bytes(m: int, k: int, cfg: dict) -> int:
    """A launch's ring: STAGES of (weight tile, rows' tile, barrier)."""
    steps, _ = steps_split(k, cfg.get("SPLIT_K", 1))
    return min(cfg.get("num_stages", 4), steps) * ((cfg["BLOCK_N"] + block_t(m)) * 128 + 8)


def fits(m: int, k: int, cfg: dict) -> bool:
    return shared_bytes(m, k, cfg) <= SHARED_BYTES


@functools.lru_cache(maxsize=None)
def _layouts(block_n: int, bt: int):
    return (gl.NVMMASharedLayout.get_default_for([block_n, 128], gl.float8e4nv),
            gl.NVMMASharedLayout.get_default_for([bt, 128], gl.float8e4nv))


def steps_split(k: int, split: int) -> tuple[int, int]:
    """(STEPS, SPLIT_K) as launched: K's 128-wide steps shared by at most `split` programs, each
    STEPS of them, and no program without a step of its own."""
    steps = triton.cdiv(k, 128)
    per = triton.cdiv(steps, max(1, min(split, steps)))
    return per, triton.cdiv(steps, per)


def w8a8(a8: torch.Tensor, sa: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
         y: torch.Tensor, cfg: dict, split: int, ws: torch.Tensor, counts: torch.Tensor, pdl_kw: dict) -> torch.Tensor:
    """y (M, N) = a8 (M, K) fp8 with its row scales sa (M, K/128) float32 (qwen3vl_kernels.fp8's quantize
    launch) times wq (N, K) fp8 with `scale` (ceil(N/bn), K/128). cfg: BLOCK_N, num_stages,
    num_warps; split > 1: ws (split, M, N) float32 and the per-tile counts
    (qwen3vl_kernels.fused_moe._split_k_buffers)."""
    m, k = a8.shape
    n = wq.shape[0]
    block_n = cfg["BLOCK_N"]
    bt = block_t(m)
    w_layout, a_layout = _layouts(block_n, bt)
    w_desc = TensorDescriptor(wq, [n, k], [wq.stride(0), 1], [block_n, 128], w_layout)
    a_desc = TensorDescriptor(a8, [m, k], [a8.stride(0), 1], [bt, 128], a_layout)
    steps, split = steps_split(k, split)
    grid = (triton.cdiv(m, bt), triton.cdiv(n, block_n), split)
    stages = min(cfg.get("num_stages", 4), steps)
    _w8a8_kernel[grid](w_desc, a_desc, scale, sa, y, ws, counts, m, n, k, scale.stride(0), sa.stride(0), y.stride(0),
                       BLOCK_N=block_n, BLOCK_T=bt, BLOCK_K=128, SCALE_N=block[0], STAGES=stages, STEPS=steps,
                       SPLIT_K=split, USE_PDL=bool(pdl_kw), num_warps=cfg.get("num_warps", 4),
                       **({"launch_pdl": True} if pdl_kw else {}))
    return y
