"""Grammar masks on the logits: -inf wherever a row's allowed-token bitmask has a 0 bit.

Structured output computes, per constrained row, a bitmask over the vocabulary on the host
(bit t % 32 of int32 word t // 32; engine/structured.py). One launch applies them all: each
program takes BLOCK vocabulary entries of one row and writes -inf only where the bit is clear,
so the logits are written, never read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _apply_bitmask_kernel(logits_ptr, words_ptr, rows_ptr, V, stride_l, stride_w, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < V
    row = tl.load(rows_ptr + r).to(tl.int64)
    words = tl.load(words_ptr + r * stride_w + offs // 32, mask=ok, other=-1)
    allowed = ((words >> (offs % 32)) & 1) != 0
    tl.store(logits_ptr + row * stride_l + offs, float("-inf"), mask=ok & ~allowed)


def apply_token_bitmask_(logits: torch.Tensor, words: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """logits (B, V) float, in place: row rows[i] masked by words[i] ((R, >= ceil(V/32)) int32)."""
    v = logits.shape[1]
    if words.dtype != torch.int32 or words.shape[0] != rows.shape[0] or words.shape[1] * 32 < v \
            or logits.stride(1) != 1 or words.stride(1) != 1:
        raise ValueError(f"apply_token_bitmask_: logits {tuple(logits.shape)}, words {tuple(words.shape)} "
                         f"{words.dtype}, rows {tuple(rows.shape)}")
    if rows.numel():
        _apply_bitmask_kernel[(rows.shape[0], triton.cdiv(v, BLOCK))](
            logits, words, rows, v, logits.stride(0), words.stride(0), BLOCK=BLOCK, num_warps=8)
    return logits


def apply_token_bitmask_reference_(logits: torch.Tensor, words: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    v = logits.shape[1]
    bits = (words[:, :, None] >> torch.arange(32, device=words.device, dtype=torch.int32)) & 1
    allowed = bits.reshape(words.shape[0], -1)[:, :v].bool()
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
    return logits
