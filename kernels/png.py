"""PNG scanlines unfiltered on the GPU: the inflated rows (each a filter byte, then its bytes) ->
the image's bytes, as a PNG decoder's own unfiltering gives them (lossless, so bit for bit).

A byte's value depends on the one `bpp` bytes to its left (a), the one above (b) and the one
above-left (c) after they are unfiltered themselves (Sub: a, Up: b, Average: (a + b) >> 1, Paeth:
whichever of a, b, c is nearest a + b - c). So the kernel runs as a wavefront: one program, one
lane a row for a band of up to ROWS rows, and at step t row r unfilters its pixel t - r, where the
row above unfilters the same pixel one step before and hands it down (a gather across lanes); a
band's first row reads the band before's last from memory. Steps: W + ROWS - 1 a band (a 1280x720
image: two bands of 512 lanes, ~3,600 steps); each step's loads are issued the step before, so
only the gather and the arithmetic are in a step's chain. Not yet timed on a GPU.
`unfilter_reference` is the same arithmetic in torch, a row at a time (tests, CPUs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FILTERS = 5         # None, Sub, Up, Average, Paeth; a row naming another makes the image invalid
MAX_ROWS = 512      # lanes of the wavefront (rows a band; 1024 of 3-byte pixels spill on sm_90)


@triton.jit
def _unfilter_kernel(src_ptr, out_ptr, H, P, src_stride, out_stride,
                     BPP: tl.constexpr, BPP_P2: tl.constexpr, ROWS: tl.constexpr):
    lane = tl.arange(0, ROWS)
    k = tl.arange(0, BPP_P2)
    above = tl.broadcast_to(tl.maximum(lane - 1, 0)[:, None], (ROWS, BPP_P2))    # the lane a row up
    first = (lane == 0)[:, None]
    for y0 in range(0, H, ROWS):
        tl.debug_barrier()      # the band before's rows, stored, before its last row is read
        y = y0 + lane
        live = y < H
        rows = src_ptr + y.to(tl.int64)[:, None] * src_stride
        up_rows = out_ptr + (y - 1).to(tl.int64)[:, None] * out_stride     # lane 0's: the band before's
        kind = tl.load(src_ptr + y.to(tl.int64) * src_stride, mask=live, other=0).to(tl.int32)[:, None]
        a = tl.zeros((ROWS, BPP_P2), tl.int32)        # left, unfiltered
        c = tl.zeros((ROWS, BPP_P2), tl.int32)        # above-left, unfiltered
        last = tl.zeros((ROWS, BPP_P2), tl.int32)     # every lane's byte of the step before
        # each step's loads go out a step ahead: they do not depend on the wavefront
        on = ((live & (lane == 0))[:, None] & (k < BPP)[None, :])
        f_next = tl.load(rows + 1 + k[None, :], mask=on, other=0)
        b_next = tl.load(up_rows + k[None, :], mask=on & first & (y0 > 0), other=0)
        for t in range(0, P + ROWS - 1):
            x = t - lane
            on = (live & (x >= 0) & (x < P))[:, None] & (k < BPP)[None, :]
            col = x[:, None] * BPP + k[None, :]
            f = f_next.to(tl.int32)
            b_mem = b_next.to(tl.int32)
            on_next = (live & (x + 1 >= 0) & (x + 1 < P))[:, None] & (k < BPP)[None, :]
            f_next = tl.load(rows + 1 + col + BPP, mask=on_next, other=0)
            b_next = tl.load(up_rows + col + BPP, mask=on_next & first & (y0 > 0), other=0)
            b = tl.where(first, b_mem, tl.gather(last, above, 0))
            pa = tl.abs(b - c)
            pb = tl.abs(a - c)
            pc = tl.abs(a + b - 2 * c)
            paeth = tl.where((pa <= pb) & (pa <= pc), a, tl.where(pb <= pc, b, c))
            pred = tl.where(kind == 1, a, tl.where(kind == 2, b, tl.where(kind == 3, (a + b) >> 1,
                                                                          tl.where(kind == 4, paeth, 0))))
            v = (f + pred) & 255
            tl.store(out_ptr + y.to(tl.int64)[:, None] * out_stride + col, v.to(tl.uint8), mask=on)
            a = tl.where(on, v, a)
            c = tl.where(on, b, c)
            last = v


def _check(data: torch.Tensor, bpp: int) -> tuple[int, int]:
    if data.dim() != 2 or data.dtype != torch.uint8 or data.shape[1] < 2 or not 1 <= bpp <= 8:
        raise ValueError(f"PNG scanlines are (H, 1 + row bytes) uint8 with 1 <= bpp <= 8, not "
                         f"{tuple(data.shape)} {data.dtype}, bpp {bpp}")
    h, row = data.shape[0], data.shape[1] - 1
    if row % bpp:
        raise ValueError(f"a row of {row} bytes is not whole pixels of {bpp} bytes")
    return h, row


def unfilter(data: torch.Tensor, bpp: int) -> torch.Tensor:
    """(H, 1 + row bytes) uint8 scanlines, each row's filter type first -> (H, row bytes) uint8.
    `bpp`: bytes a pixel, at least one (PNG's filter distance). The filter types must be < 5 (the
    caller checks: a decoder refuses the image otherwise)."""
    h, row = _check(data, bpp)
    data = data.contiguous()
    out = torch.empty(h, row, dtype=torch.uint8, device=data.device)
    rows, width = min(MAX_ROWS, triton.next_power_of_2(h)), triton.next_power_of_2(bpp)
    # eight lanes' bytes a thread (sm_90 compiles 512 lanes of 3-byte pixels at 8 warps unspilled)
    _unfilter_kernel[(1,)](data, out, h, row // bpp, data.stride(0), out.stride(0), BPP=bpp, BPP_P2=width,
                           ROWS=rows, num_warps=min(32, max(4, rows * width // 256)))
    return out


def unfilter_reference(data: torch.Tensor, bpp: int) -> torch.Tensor:
    """unfilter's arithmetic in torch, a row at a time and, for Average and Paeth, a pixel at a time."""
    h, row = _check(data, bpp)
    src = data.to(torch.int32)
    out = torch.zeros(h, row, dtype=torch.int32)
    zero = torch.zeros(row, dtype=torch.int32)
    for y in range(h):
        kind, f = int(src[y, 0]), src[y, 1:]
        up = out[y - 1] if y else zero
        if kind not in range(FILTERS):
            raise ValueError(f"row {y}: filter type {kind}")
        if kind in (0, 2):
            out[y] = (f + (up if kind == 2 else 0)) & 255
        elif kind == 1:     # each byte adds the one bpp to its left: a running sum per byte of a pixel
            out[y] = f.view(-1, bpp).cumsum(0).view(-1) & 255
        else:
            for x in range(0, row, bpp):
                s = slice(x, x + bpp)
                a = out[y, x - bpp:x] if x else zero[:bpp]
                c = up[x - bpp:x] if x else zero[:bpp]
                b = up[s]
                if kind == 3:
                    pred = (a + b) >> 1
                else:
                    pa, pb, pc = (b - c).abs(), (a - c).abs(), (a + b - 2 * c).abs()
                    pred = torch.where((pa <= pb) & (pa <= pc), a, torch.where(pb <= pc, b, c))
                out[y, s] = (f[s] + pred) & 255
    return out.to(torch.uint8)
