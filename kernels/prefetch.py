"""Weights asked of L2 ahead of the kernel that reads them (kernels.switches.L2_NEXT).

At small decode batches a layer's dense projections are latency-bound GEMVs over weights past
L2 (30B-A3B fp8: qkv 10.5 MB, o_proj 8.4 MB; H200 L2 50 MB), while the MoE before the next
layer's projections moves its experts at about half of HBM's rate. `l2_prefetch` asks L2 for the
next layer's weights while the experts run, so that its GEMVs may find them there. One launch of
a few programs: each lane asks for one CHUNK-byte piece by one `cp.async.bulk.prefetch.L2`
(sm_90: the SM's copy engine fetches it; nothing comes back and nothing waits for it).

With PDL the launch lets the next kernel start at once and only then waits for the kernel
before it, so that its end still means that kernel's end (the MoE pair kernels read the routing
before their own wait, relying on it). Off a GPU it launches nothing: it changes no value.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import gdc_launch, gdc_wait, pdl

CHUNK = 16384               # bytes one lane asks for (a multiple of 16, as the instruction needs)
LANES = 32                  # lanes a program (one warp)
MAX_TENSORS = 3             # tensors one launch takes

# PTX: ask L2 for $2 bytes from $1 (a size of 0: nothing). EVICT_LAST's marks the lines to be
# evicted after others (the experts' weights, which are read once).
_BULK = tl.constexpr("{ .reg .pred p; setp.ne.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; "
         "mov.b32 $0, 0; }")
_BULK_LAST = tl.constexpr("{ .reg .pred p; .reg .b64 pol; setp.ne.s32 p, $2, 0; "
              "createpolicy.fractional.L2::evict_last.b64 pol, 1.0; "
              "@p cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $2, pol; mov.b32 $0, 0; }")


@triton.jit
def _ask(base, nbytes, CHUNK: tl.constexpr, LANES: tl.constexpr, EVICT_LAST: tl.constexpr):
    """This program's lanes' pieces of [base, base + nbytes): piece j is CHUNK bytes from j * CHUNK,
    the last one shorter; lanes past the end ask for nothing."""
    offs = (tl.program_id(0) * LANES + tl.arange(0, LANES)).to(tl.int64) * CHUNK
    ok = offs < nbytes
    size = tl.where(ok, tl.minimum(nbytes - offs, CHUNK), 0).to(tl.int32)
    ptrs = base.to(tl.pointer_type(tl.int8)) + tl.where(ok, offs, 0)
    if EVICT_LAST:
        tl.inline_asm_elementwise(_BULK_LAST, "=r,l,r", [ptrs, size], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise(_BULK, "=r,l,r", [ptrs, size], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _l2_prefetch_kernel(p0, n0, p1, n1, p2, n2, CHUNK: tl.constexpr, LANES: tl.constexpr,
                        EVICT_LAST: tl.constexpr, USE_PDL: tl.constexpr = False):
    gdc_launch(USE_PDL)
    _ask(p0, n0, CHUNK, LANES, EVICT_LAST)
    _ask(p1, n1, CHUNK, LANES, EVICT_LAST)
    _ask(p2, n2, CHUNK, LANES, EVICT_LAST)
    gdc_wait(USE_PDL)


def prefetch_pieces(tensors: list[torch.Tensor]) -> list[tuple[torch.Tensor, int]]:
    """(tensor, bytes asked) for each tensor: its whole storage from its first element, down to a
    multiple of 16 (the instruction's unit; never past the end). ValueError for more than
    MAX_TENSORS or a tensor not contiguous."""
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"l2_prefetch takes at most {MAX_TENSORS} tensors, got {len(tensors)}")
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError("l2_prefetch: tensors must be contiguous")
    return [(t, (t.numel() * t.element_size()) // 16 * 16) for t in tensors]


def l2_prefetch(tensors: list[torch.Tensor], evict_last: bool = False) -> None:
    """Ask L2 for these tensors (at most MAX_TENSORS, on one GPU); on the CPU, nothing."""
    pieces = prefetch_pieces([t for t in tensors if t is not None])
    if not pieces or not pieces[0][0].is_cuda:
        return
    while len(pieces) < MAX_TENSORS:
        pieces.append((pieces[0][0], 0))
    grid = (max(triton.cdiv(n, CHUNK * LANES) for _, n in pieces),)
    args = [a for piece in pieces for a in piece]
    _l2_prefetch_kernel[grid](*args, CHUNK=CHUNK, LANES=LANES, EVICT_LAST=evict_last, num_warps=1, num_stages=1,
                              **pdl(pieces[0][0]))
