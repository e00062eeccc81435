"""The fp8 MoE pair path's down kernel (a decode batch of 1-16 tokens) in Gluon: each program asks
for all of its weights through TMA into shared memory before PDL's wait for gate_up.

Why: at one token kernels.fused_moe's pair down (a 3-D tile of the token's top-k experts, 240
registers on sm_90) reads its first 256-wide K step in registers before the wait and the rest
after it: ~6 us a layer for 12.6 MB at 30B-A3B. Its registers leave no room on an SM beside
gate_up's programs, so its programs start as gate_up's finish. Here a program's weights go to
shared memory (TOP_K x STEPS boxes of BLOCK_N x 128 fp8, one mbarrier a slot) and hold no
registers while in flight: a program needs few registers, may run beside gate_up's, and its
weights can land while gate_up still runs. After the wait only the activations (SiLU * up, bf16)
are read, each slot's rows multiplied from shared memory.

The arithmetic is the plain kernel's: W8A16, float32 products of each weight and its column's
activation times the step's weight-scale block and the slot's routing weight, summed over the
slots and K in float32. Another rank's expert (id num_experts) is not read. Like the plain
kernel's PREFETCH, the routing is read before the wait: gate_up, launched with PREFETCH, waited
for the router's kernel before it let this one launch (without PREFETCH this waits first).

GPU only (sm_90): Triton's interpreter runs no Gluon. CPU tests compile it for sm_90a and check
its PTX (the TMA copies before the wait) and ptxas's report; GPU tests check it against the plain
kernel.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .gluon_dense import _pdl, gl, gluon

if gluon is not None:
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

BLOCK_K = 128               # a TMA box's columns: one 128-wide weight-scale block
_BOX = tl.constexpr(BLOCK_K)
SHARED_MAX = 200 * 1024     # a program's boxes at most (an H100's or H200's 227 KB a block, less the rest)


def available() -> bool:
    return gluon is not None


if gluon is not None:
    @gluon.jit
    def _down_kernel(act_ptr, w_desc, ids_ptr, weights_ptr, out_ptr, s_ptr, N, K, top_k, num_experts,
                     stride_am, stride_om, stride_se, stride_sn, TOP_K: gl.constexpr, STEPS: gl.constexpr,
                     BLOCK_N: gl.constexpr, BN: gl.constexpr, PREFETCH: gl.constexpr, USE_PDL: gl.constexpr,
                     num_warps: gl.constexpr):
        """out (M, N) = sum over token m's TOP_K slots of weight * act[pair] @ W2[expert]^T, BLOCK_N
        of N a program (inside one BN-row scale block), K in STEPS boxes of 128 (TMA's zeros past
        K). w_desc: w2 (E, N, K) fp8 as (E * N, K) rows; s (E, N/BN, K/128) its scales."""
        token = gl.program_id(0)
        off_n = gl.program_id(1) * BLOCK_N
        rows: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [num_warps, 1], [1, 0])
        slots_l: gl.constexpr = gl.BlockedLayout([1, 4], [2, 16], [num_warps, 1], [1, 0])
        w_s = gl.allocate_shared_memory(w_desc.dtype, [TOP_K * STEPS, BLOCK_N, _BOX], w_desc.layout)
        a_s = gl.allocate_shared_memory(gl.float32, [STEPS, TOP_K, _BOX], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        bars = gl.allocate_shared_memory(gl.int64, [TOP_K, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(TOP_K):
            mbarrier.init(bars.index(s), count=1)
        if PREFETCH:
            _pdl(USE_PDL, False)
        else:
            _pdl(USE_PDL, True)
            _pdl(USE_PDL, False)

        # every slot's boxes asked for at once (its expert's rows off_n.., all of K); the ids in one
        # load, each slot's taken out of it in registers (a load a slot put TOP_K round trips to
        # memory before the last slot's copies: 11.2 us alone against 8.3 for the plain kernel)
        every: gl.constexpr = gl.BlockedLayout([TOP_K], [32], [num_warps], [0])    # each thread all TOP_K
        mine = gl.arange(0, TOP_K, layout=every)
        ids = gl.load(ids_ptr + token * top_k + mine)
        slots = gl.arange(0, TOP_K, layout=gl.SliceLayout(1, slots_l))
        pairs = token * top_k + slots
        experts = gl.load(ids_ptr + pairs)
        ok = experts < num_experts
        slot_bytes: gl.constexpr = STEPS * w_desc.block_type.nbytes
        for s in gl.static_range(TOP_K):
            expert = gl.sum(gl.where(mine == s, ids, 0), axis=0)
            if expert < num_experts:
                mbarrier.expect(bars.index(s), slot_bytes)
                for j in gl.static_range(STEPS):
                    tma.async_copy_global_to_shared(w_desc, [expert * N + off_n, j * _BOX], bars.index(s),
                                                    w_s.index(s * STEPS + j))
        s_rows = s_ptr + gl.where(ok, experts, 0).to(gl.int64) * stride_se + (off_n // BN) * stride_sn
        routed = gl.load(weights_ptr + pairs, mask=ok, other=0.0)
        if PREFETCH:
            _pdl(USE_PDL, True)         # gate_up's activations are final from here

        # the token's TOP_K rows of activations, each 128-wide step times its slot's weight-scale
        # block and routing weight, into shared memory (loaded together, then read a row at a time)
        offs_k = gl.arange(0, _BOX, layout=gl.SliceLayout(0, slots_l))
        for j in gl.static_range(STEPS):
            k = j * _BOX + offs_k
            act = gl.load(act_ptr + pairs[:, None].to(gl.int64) * stride_am + k[None, :],
                          mask=ok[:, None] & (k < K)[None, :], other=0.0).to(gl.float32)
            a_s.index(j).store(act * (gl.load(s_rows + j, mask=ok, other=0.0) * routed)[:, None])
        gl.thread_barrier()

        acc = gl.zeros([BLOCK_N, _BOX], gl.float32, rows)
        for s in gl.static_range(TOP_K):
            expert = gl.sum(gl.where(mine == s, ids, 0), axis=0)
            if expert < num_experts:
                mbarrier.wait(bars.index(s), 0)
                for j in gl.static_range(STEPS):
                    row = a_s.index(j).slice(s, 1).load(rows)
                    acc += w_s.index(s * STEPS + j).load(rows).to(gl.float32) * row
        for s in gl.static_range(TOP_K):
            mbarrier.invalidate(bars.index(s))
        out = gl.sum(acc, axis=1)
        offs_n = off_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, rows))
        gl.store(out_ptr + token * stride_om + offs_n, out.to(out_ptr.dtype.element_ty), mask=offs_n < N)


def steps(k: int) -> int:
    return triton.cdiv(k, BLOCK_K)


def shared_bytes(top_k: int, k: int, block_n: int) -> int:
    """A program's weight boxes, its scaled activations (float32) and barriers."""
    return top_k * steps(k) * BLOCK_K * (block_n + 4) + 8 * top_k


def down_shape_ok(k: int, top_k: int, block: tuple[int, int], block_n: int, num_warps: int) -> bool:
    """Shapes the kernel takes: rows of K fp8 that TMA can stride (16-byte multiples), 128-wide scale
    blocks, BLOCK_N rows inside one scale block and a multiple of the layout's 2 x num_warps rows,
    a program's boxes and activations within SHARED_MAX."""
    return (gluon is not None and k % 16 == 0 and block[1] == BLOCK_K and block[0] % block_n == 0
            and block_n % (2 * num_warps) == 0 and shared_bytes(top_k, k, block_n) <= SHARED_MAX)


def down_ok(w2: torch.Tensor, top_k: int, block: tuple[int, int], block_n: int, num_warps: int) -> bool:
    """down_shape_ok, for fp8 experts (E, N, K) contiguous on a Hopper GPU, 16-byte aligned."""
    return (w2.is_cuda and w2.dtype == torch.float8_e4m3fn and w2.is_contiguous() and w2.data_ptr() % 16 == 0
            and torch.cuda.get_device_capability(w2.device)[0] >= 9
            and down_shape_ok(w2.shape[2], top_k, block, block_n, num_warps))


@functools.lru_cache(maxsize=None)
def _layout(block_n: int):
    return gl.NVMMASharedLayout.get_default_for([block_n, BLOCK_K], gl.float8e4nv)


def down(act: torch.Tensor, w2: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, out: torch.Tensor,
         scale: torch.Tensor, top_k: int, block: tuple[int, int], block_n: int, num_warps: int, prefetch: bool,
         pdl_kw: dict) -> torch.Tensor:
    """out (M, N) = the top-k combine of act (M * top_k, K) through w2 (E, N, K) fp8 with `scale`
    (E, N/bn, K/128), ids (M * top_k,) int32 and weights float32 (down_ok's shapes)."""
    e, n, k = w2.shape
    m = out.shape[0]
    desc = TensorDescriptor(w2.view(e * n, k), [e * n, k], [k, 1], [block_n, BLOCK_K], _layout(block_n))
    _down_kernel[(m, triton.cdiv(n, block_n))](
        act, desc, ids, weights, out, scale, n, k, top_k, e, act.stride(0), out.stride(0), scale.stride(0),
        scale.stride(1), TOP_K=top_k, STEPS=steps(k), BLOCK_N=block_n, BN=block[0], PREFETCH=prefetch,
        USE_PDL=bool(pdl_kw), num_warps=num_warps, **({"launch_pdl": True} if pdl_kw else {}))
    return out
