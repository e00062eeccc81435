"""The fp8 MoE's sorted path at decode batches (W8A8, 16-128 tokens) in Gluon: each expert block's
K steps with one step's wgmmas in flight while the step before is scaled, as kernels.gluon_dense
does for the dense projections.

Why: at 16 and 64 tokens the sorted path's grouped GEMMs read most experts once (c16: ~82 of 128
experts, gate_up 67 us a layer against 54 of bytes, down 38 against 27; NOTES, twentieth and
thirty-second sessions), and Triton-lang waits for each K step's product before scaling it, so
one warpgroup an SM idles on every step. Gluon issues step i's products, then waits for step
i-1's (num_outstanding: the products of one step), scales and adds them, and refills its stage.

The layout (swap-AB, as gluon_dense): an expert's weight rows are the wgmma's M side (BLOCK_N of
them inside one scale block), a block of BLOCK_T sorted rows its N side, K in 128-wide steps
through a STAGES-deep ring of TMA loads. TMA needs the rows contiguous, so the sorted path's
activations are laid out in sorted order first (`sorted_rows`: row r is pair sorted_ids[r]'s
token, quantized per 128-wide group; padding rows zeros), and gate_up writes its SiLU * up rows
in the same order, for the next quantize and down's TMA. gate_up (FUSE_SILU) multiplies a gate
and an up tile a step, two products in flight; down (MUL_WEIGHT) scales its rows by their routing
weights and stores them at their pair's row, for kernels.fused_moe.sum_top_k.

PDL: the kernel before each (the rows' quantize) waits for its own predecessor before it lets
this one launch, so align's outputs (the padded total, the blocks' experts) are final when a
program starts: it reads them and asks for its weight tiles before its own wait, then its rows.

GPU only (sm_90): Triton's interpreter runs no Gluon. CPU tests compile it for sm_90a and check
the overlap in its PTX and ptxas's report (tests/test_gluon_moe.py); GPU tests check it against
the grouped GEMM's W8A8 path.
"""

from __future__ import annotations

import functools

import torch
import triton

from .gluon_dense import _pdl, gl, gluon

if gluon is not None:
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

BLOCK_T = 16                # a block of sorted rows: the wgmma's N side (the sorted path's BLOCK_M)


def available() -> bool:
    return gluon is not None


if gluon is not None:
    @gluon.jit
    def _load(w_desc, a_desc, w_s, a_s, bars, i: gl.constexpr, w_row, up_row, off_t, WEIGHTS: gl.constexpr,
              ROWS: gl.constexpr, stage_bytes: gl.constexpr, FUSE_SILU: gl.constexpr, STAGES: gl.constexpr):
        """Step i's tiles into its stage by TMA: WEIGHTS, the weight tile (and up's: FUSE_SILU),
        after the stage barrier's expected bytes are set; ROWS, the rows' tile."""
        bar = bars.index(i % STAGES)
        if WEIGHTS:
            mbarrier.expect(bar, stage_bytes)
            if FUSE_SILU:
                tma.async_copy_global_to_shared(w_desc, [w_row, i * 128], bar, w_s.index(2 * (i % STAGES)))
                tma.async_copy_global_to_shared(w_desc, [up_row, i * 128], bar, w_s.index(2 * (i % STAGES) + 1))
            else:
                tma.async_copy_global_to_shared(w_desc, [w_row, i * 128], bar, w_s.index(i % STAGES))
        if ROWS:
            tma.async_copy_global_to_shared(a_desc, [off_t, i * 128], bar, a_s.index(i % STAGES))

    @gluon.jit
    def _issue(w_s, a_s, bars, zero, i: gl.constexpr, FUSE_SILU: gl.constexpr, STAGES: gl.constexpr):
        """Step i's products (gate's and up's, or the one), issued once its stage has landed."""
        mbarrier.wait(bars.index(i % STAGES), (i // STAGES) & 1)
        rows = a_s.index(i % STAGES).permute((1, 0))
        if FUSE_SILU:
            g = warpgroup_mma(w_s.index(2 * (i % STAGES)), rows, zero, use_acc=False, is_async=True)
            u = warpgroup_mma(w_s.index(2 * (i % STAGES) + 1), rows, zero, use_acc=False, is_async=True)
        else:
            g = warpgroup_mma(w_s.index(i % STAGES), rows, zero, use_acc=False, is_async=True)
            u = g
        return g, u

    @gluon.jit
    def _scales(sw_gate, sw_up, sa_rows, kb, steps, FUSE_SILU: gl.constexpr):
        """Step kb's scales: the gate (or only) tile's and (FUSE_SILU) up's weight block, each times
        every row's (0 past K's last block, whose tiles are TMA's zero fill)."""
        inside = kb < steps
        sa = gl.load(sa_rows + kb, mask=inside, other=0.0)
        s_g = gl.load(sw_gate + kb, mask=inside, other=0.0) * sa
        s_u = s_g
        if FUSE_SILU:
            s_u = gl.load(sw_up + kb, mask=inside, other=0.0) * sa
        return s_g, s_u

    @gluon.jit
    def _retire(acc_g, acc_u, g, u, s_g, s_u, FUSE_SILU: gl.constexpr, OUTSTANDING: gl.constexpr):
        """A step's products, waited for (OUTSTANDING: the next step's still running), scaled in."""
        if FUSE_SILU:
            g, u = warpgroup_mma_wait(num_outstanding=OUTSTANDING, deps=(g, u))
            acc_g = acc_g + g * s_g[None, :]
            acc_u = acc_u + u * s_u[None, :]
        else:
            g = warpgroup_mma_wait(num_outstanding=OUTSTANDING, deps=(g, ))
            acc_g = acc_g + g * s_g[None, :]
        return acc_g, acc_u

    @gluon.jit
    def _moe_kernel(w_desc, a_desc, sw_ptr, sa_ptr, y_ptr, ids_ptr, expert_ptr, total_ptr, weights_ptr,
                    N, K, w_rows, num_valid, num_experts, stride_se, stride_sn, stride_sa, stride_y,
                    BLOCK_N: gl.constexpr, BLOCK_T: gl.constexpr, STAGES: gl.constexpr, STEPS: gl.constexpr,
                    FUSE_SILU: gl.constexpr, MUL_WEIGHT: gl.constexpr, USE_PDL: gl.constexpr,
                    num_warps: gl.constexpr):
        """One (block of BLOCK_T sorted rows, BLOCK_N output columns) tile of an expert's W8A8 GEMM:
        y = rows (a_desc: (R, K) fp8, sorted order, scales sa (R, K/128)) times the expert's rows of
        w (w_desc: (E * w_rows, K) fp8, scales sw (E, w_rows/128, K/128)). FUSE_SILU: w is w13,
        gate rows [0, N) and up rows [N, 2N); y (R, N) = SiLU(gate) * up at the sorted rows.
        MUL_WEIGHT: y (pairs, N) = the product times the pair's routing weight, at the pair's row
        (sorted_ids'); padding rows are not stored. Blocks past the padded total, and the
        expert-parallel sentinel's (expert id num_experts), do nothing."""
        pid_m = gl.program_id(0)
        pid_n = gl.program_id(1)
        off_t = pid_m * BLOCK_T
        off_n = pid_n * BLOCK_N
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                      instr_shape=[16, BLOCK_T, 32])
        cols: gl.constexpr = gl.SliceLayout(0, mma)
        tiles: gl.constexpr = 2 if FUSE_SILU else 1
        w_s = gl.allocate_shared_memory(w_desc.dtype, [STAGES * tiles, BLOCK_N, 128], w_desc.layout)
        a_s = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_T, 128], a_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        stage_bytes: gl.constexpr = tiles * w_desc.block_type.nbytes + a_desc.block_type.nbytes

        _pdl(USE_PDL, False)
        # align's outputs, final before this launch (the module's docstring)
        expert = gl.load(expert_ptr + pid_m)
        if (off_t < gl.load(total_ptr)) & (expert < num_experts):
            w_row = expert * w_rows + off_n
            up_row = w_row + N
            for i in gl.static_range(STAGES):               # weights: no kernel writes them
                _load(w_desc, a_desc, w_s, a_s, bars, i, w_row, up_row, off_t, True, False, stage_bytes, FUSE_SILU,
                      STAGES)
            _pdl(USE_PDL, True)
            for i in gl.static_range(STAGES):
                _load(w_desc, a_desc, w_s, a_s, bars, i, w_row, up_row, off_t, False, True, stage_bytes, FUSE_SILU,
                      STAGES)

            offs_t = off_t + gl.arange(0, BLOCK_T, layout=cols)
            sw_e = sw_ptr + expert.to(gl.int64) * stride_se
            sw_gate = sw_e + (off_n // 128) * stride_sn
            sw_up = sw_e + ((off_n + N) // 128) * stride_sn
            sa_rows = sa_ptr + offs_t * stride_sa
            steps = gl.cdiv(K, 128)
            acc_g = gl.zeros([BLOCK_N, BLOCK_T], gl.float32, mma)
            acc_u = gl.zeros([BLOCK_N, BLOCK_T], gl.float32, mma)
            zero = gl.zeros([BLOCK_N, BLOCK_T], gl.float32, mma)     # use_acc=False: its value is not read
            # unrolled, as gluon_dense's (a product in flight across a loop's back edge serializes
            # every wgmma in ptxas); a step's scales loaded once its tiles have landed
            g_prev, u_prev = _issue(w_s, a_s, bars, zero, 0, FUSE_SILU, STAGES)
            sg_prev, su_prev = _scales(sw_gate, sw_up, sa_rows, 0, steps, FUSE_SILU)
            for i in gl.static_range(1, STEPS):
                g, u = _issue(w_s, a_s, bars, zero, i, FUSE_SILU, STAGES)
                sg, su = _scales(sw_gate, sw_up, sa_rows, i, steps, FUSE_SILU)
                acc_g, acc_u = _retire(acc_g, acc_u, g_prev, u_prev, sg_prev, su_prev, FUSE_SILU, tiles)
                if i - 1 + STAGES < STEPS:                 # step i-1's stage is free: step i-1+STAGES's tiles
                    _load(w_desc, a_desc, w_s, a_s, bars, i - 1 + STAGES, w_row, up_row, off_t, True, True,
                          stage_bytes, FUSE_SILU, STAGES)
                g_prev, u_prev, sg_prev, su_prev = g, u, sg, su
            acc_g, acc_u = _retire(acc_g, acc_u, g_prev, u_prev, sg_prev, su_prev, FUSE_SILU, 0)

            offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, mma))
            n_ok = (offs_n < N)[:, None]
            if FUSE_SILU:
                out = acc_g / (1.0 + gl.exp(-acc_g)) * acc_u
                gl.store(y_ptr + offs_t[None, :] * stride_y + offs_n[:, None], out.to(y_ptr.dtype.element_ty),
                         mask=n_ok)
            else:
                pair = gl.load(ids_ptr + offs_t)
                valid = pair < num_valid
                out = acc_g
                if MUL_WEIGHT:
                    out = out * gl.load(weights_ptr + pair, mask=valid, other=0.0)[None, :]
                gl.store(y_ptr + pair.to(gl.int64)[None, :] * stride_y + offs_n[:, None],
                         out.to(y_ptr.dtype.element_ty), mask=n_ok & valid[None, :])
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(bars.index(i))


SHARED_BYTES = 220 * 1024       # an H100's and H200's 227 KB a block, less what the compiler adds


def shared_bytes(k: int, cfg: dict, fuse_silu: bool) -> int:
    """A launch's ring: STAGES of (weight tiles, rows' tile, barrier)."""
    stages = min(cfg.get("num_stages", 4), triton.cdiv(k, 128))
    return stages * (((2 if fuse_silu else 1) * cfg["BLOCK_N"] + BLOCK_T) * 128 + 8)


def down_config(cfg: dict) -> dict:
    """A GLUON launch shape's down GEMM: its "DOWN" keys over gate_up's."""
    return {**cfg, **cfg.get("DOWN", {})}


def launch_ok(inter: int, hidden: int, block: tuple[int, int], cfg: dict, block_m: int) -> bool:
    """Shapes the kernels take (cfg: gate_up's launch, down_config's for down): 128 x 128 scale
    blocks, BLOCK_N (64 or 128) dividing each output's columns, K rows TMA can stride (16-byte
    multiples), 16-row blocks of sorted rows, and each ring in shared memory."""
    down = down_config(cfg)
    return (gluon is not None and tuple(block) == (128, 128) and block_m == BLOCK_T
            and all(c["BLOCK_N"] in (64, 128) and n % c["BLOCK_N"] == 0 and k % 16 == 0
                    and shared_bytes(k, c, fuse) <= SHARED_BYTES
                    for c, n, k, fuse in ((cfg, inter, hidden, True), (down, hidden, inter, False))))


@functools.lru_cache(maxsize=None)
def _layouts(block_n: int):
    return (gl.NVMMASharedLayout.get_default_for([block_n, 128], gl.float8e4nv),
            gl.NVMMASharedLayout.get_default_for([BLOCK_T, 128], gl.float8e4nv))


def grouped(rows: torch.Tensor, rows_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, y: torch.Tensor,
            sorted_ids: torch.Tensor, block_expert: torch.Tensor, total: torch.Tensor, weights: torch.Tensor,
            num_valid: int, cfg: dict, fuse_silu: bool, pdl_kw: dict) -> torch.Tensor:
    """One of the sorted path's GEMMs (_moe_kernel): rows (R, K) fp8 in sorted order with their
    scales (R, K/128); w (E, w_rows, K) fp8 with w_scale (E, w_rows/128, K/128); fuse_silu: w13,
    y (R, w_rows/2) the sorted rows' SiLU * up; else w2, y (pairs, w_rows), each pair's row times
    its routing weight. cfg: BLOCK_N, num_stages, num_warps."""
    e, w_rows, k = w.shape
    n = w_rows // 2 if fuse_silu else w_rows
    block_n = cfg["BLOCK_N"]
    w_layout, a_layout = _layouts(block_n)
    w2d = w.view(e * w_rows, k)
    w_desc = TensorDescriptor(w2d, [e * w_rows, k], [w2d.stride(0), 1], [block_n, 128], w_layout)
    a_desc = TensorDescriptor(rows, [rows.shape[0], k], [rows.stride(0), 1], [BLOCK_T, 128], a_layout)
    steps = triton.cdiv(k, 128)
    grid = (block_expert.numel(), n // block_n)
    _moe_kernel[grid](w_desc, a_desc, w_scale, rows_scale, y, sorted_ids, block_expert, total, weights, n, k, w_rows,
                      num_valid, e, w_scale.stride(0), w_scale.stride(1), rows_scale.stride(0), y.stride(0),
                      BLOCK_N=block_n, BLOCK_T=BLOCK_T, STAGES=min(cfg.get("num_stages", 4), steps), STEPS=steps,
                      FUSE_SILU=fuse_silu, MUL_WEIGHT=not fuse_silu, USE_PDL=bool(pdl_kw),
                      num_warps=cfg.get("num_warps", 4), **({"launch_pdl": True} if pdl_kw else {}))
    return y
