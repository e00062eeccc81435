"""Top-k sampling (with top-p, min-p and temperature) over a batch's logits rows, in three launches.

The sampler's torch path takes a row's candidates from torch.topk, the softmax's denominator from a
log-sum-exp over the vocabulary, then masks and a draw: about twenty small launches, which on an
H200 put 0.19 ms on a batch-1 decode step of 30B-A3B under the release's generation config
(temperature 0.7, top_p 0.8, top_k 20), where greedy's argmax takes two.

Each row is split over PARTS programs, which scale their chunk by 1/temperature and keep its
maximum and sum of exponentials (the log-sum-exp's pieces). The same programs again (the chunk
read once more, mostly from L2) each offer the values of their chunk at or above the row's
threshold, the KP-th largest of the parts' maxima: KP parts hold a value at least that, so the
row's KP largest values are among them, and most parts hold none or one (at most KP are taken).
A value and its index are packed in one int64 (its float32 bits made order-preserving as a
signed integer, then the index, lower index first on a tie). One program a row then takes the
KP largest of its parts' candidates, their probabilities under the whole vocabulary's softmax,
top-k, top-p (on the cumulated probabilities before each token, as the torch path) and min-p,
and draws by an exponential race: the largest p / E with E = -log(1 - u) for the uniform u the
caller gives (torch.rand, so torch's generator and seed rule the draw).

The second launch took a tl.topk of each whole chunk before (the fortieth session's, a bitonic
sort of 4,096 keys a program): at 64 and 128 rows, 64 such programs a row made the kernel slower
than the torch path, so it drew batches of up to 16 rows only.

Non-finite logits: NaN counts as -inf and +inf as the largest float, so a row of NaN draws its
first token and a +inf takes the whole mass (the torch path's fallbacks give the same).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PARTS = 64          # programs a row in the first launch
MAX_K = 64          # the largest top_k drawn here (KP, the candidates a part keeps, is top_k's power of two)
# below every key `_pack` makes (-inf's is -2139095041 * 2^32 and up): a slot with no candidate; it
# unpacks to NaN (probability 0) and is never a row's first
LOWEST: tl.constexpr = tl.constexpr(-0x7FFFFFFF00000000)


@triton.jit
def _pack(x, idx):
    """float32 values and int32 indices -> int64 keys ordered as (value, then lower index first)."""
    bits = x.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - idx).to(tl.int64)


@triton.jit
def _unpack(key):
    ordered = (key >> 32).to(tl.int32)
    bits = tl.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), 0x7FFFFFFF - (key & 0xFFFFFFFF).to(tl.int32)


@triton.jit
def _scaled_chunk(x_ptr, rows_ptr, row, part, V, stride_xm, CHUNK, BLOCK: tl.constexpr):
    """A part's chunk of the row / temperature in float32 (NaN as -inf, +inf as the largest float,
    past the chunk -inf), its columns, and which of them are the chunk's."""
    cols = tl.arange(0, BLOCK)
    offs = part * CHUNK + cols
    ok = (offs < V) & (cols < CHUNK)
    inv_t = 1.0 / tl.load(rows_ptr + row * 4)
    x = tl.load(x_ptr + row * stride_xm + offs, mask=ok, other=float("-inf")).to(tl.float32) * inv_t
    x = tl.where(x == x, x, float("-inf"))                  # NaN: never a candidate
    x = tl.minimum(x, 3.4028234663852886e38)                # +inf: the largest float
    return tl.where(ok, x, float("-inf")), offs, ok


@triton.jit
def _sample_parts_kernel(x_ptr, rows_ptr, max_ptr, sum_ptr, V, stride_xm, CHUNK,
                         BLOCK: tl.constexpr, PARTS: tl.constexpr):
    """Each part's maximum and sum of exponentials (the log-sum-exp's pieces, `_lse`)."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    x, _, _ = _scaled_chunk(x_ptr, rows_ptr, row, part, V, stride_xm, CHUNK, BLOCK)
    m = tl.max(x, 0)
    s = tl.sum(tl.where(x > float("-inf"), tl.exp(x - m), 0.0), 0)
    tl.store(max_ptr + row * PARTS + part, m)
    tl.store(sum_ptr + row * PARTS + part, s)


@triton.jit
def _sample_select_kernel(x_ptr, rows_ptr, max_ptr, keys_ptr, V, stride_xm, CHUNK,
                          BLOCK: tl.constexpr, KP: tl.constexpr, PARTS: tl.constexpr):
    """A part's candidates without sorting its chunk: its values at or above tau, the KP-th largest
    of the row's part maxima (KP parts hold a value at least that, so each of the row's KP largest
    values is one), the KP largest of them as keys, largest first, and LOWEST in the slots left.
    A part with n such values takes n maxima of its keys (n is mostly 0 or 1 at the vocabulary;
    at most KP, as for a row of equal values). With fewer parts than KP, tau is -inf."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    if PARTS >= KP:
        tau = tl.min(tl.topk(tl.load(max_ptr + row * PARTS + tl.arange(0, PARTS)), KP), 0)
    else:
        tau = float("-inf")
    x, offs, ok = _scaled_chunk(x_ptr, rows_ptr, row, part, V, stride_xm, CHUNK, BLOCK)
    chosen = ok & (x >= tau)
    n = tl.minimum(tl.sum(chosen.to(tl.int32), 0), KP)
    keys = tl.where(chosen, _pack(x, offs), LOWEST)
    rank = tl.arange(0, KP)
    out = tl.full([KP], LOWEST, tl.int64)
    for i in range(n):
        best = tl.max(keys, 0)
        out = tl.where(rank == i, best, out)
        keys = tl.where(keys == best, LOWEST, keys)      # keys are distinct (their indices are)
    tl.store(keys_ptr + (row * PARTS + part) * KP + rank, out)


@triton.jit
def _lse(max_ptr, sum_ptr, row, PARTS: tl.constexpr):
    """A row's log-sum-exp from its parts' maxima and sums of exponentials (-inf where every
    value is)."""
    ms = tl.load(max_ptr + row * PARTS + tl.arange(0, PARTS))
    ss = tl.load(sum_ptr + row * PARTS + tl.arange(0, PARTS))
    big = tl.max(ms, 0)
    total = tl.sum(tl.where(ms > float("-inf"), ss * tl.exp(ms - big), 0.0), 0)
    return big + tl.log(total)


@triton.jit
def _lse_kernel(max_ptr, sum_ptr, out_ptr, PARTS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    tl.store(out_ptr + row, _lse(max_ptr, sum_ptr, row, PARTS))


@triton.jit
def _sample_pick_kernel(keys_ptr, max_ptr, sum_ptr, rows_ptr, u_ptr, out_ptr,
                        KP: tl.constexpr, PARTS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    keys = tl.load(keys_ptr + row * PARTS * KP + tl.arange(0, PARTS * KP))
    x, idx = _unpack(tl.sort(tl.topk(keys, KP), descending=True))
    lse = _lse(max_ptr, sum_ptr, row, PARTS)       # -inf only where every candidate is (then every p is 0)
    p = tl.where(x > float("-inf"), tl.exp(x - lse), 0.0)
    top_p = tl.load(rows_ptr + row * 4 + 1)
    min_p = tl.load(rows_ptr + row * 4 + 2)
    k = tl.load(rows_ptr + row * 4 + 3)
    rank = tl.arange(0, KP)
    before = tl.cumsum(p, 0) - p
    keep = (rank == 0) | ((rank.to(tl.float32) < k) & (before < top_p) & (p >= min_p * tl.max(p, 0)))
    u = tl.load(u_ptr + row * KP + rank)
    race = tl.where(keep, p, 0.0) / tl.maximum(-tl.log(1.0 - u), 1e-30)
    _, at = tl.max(race, 0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(out_ptr + row, tl.sum(tl.where(rank == at, idx, 0), 0).to(tl.int64))


def candidates_width(top_k: int) -> int:
    """KP: the candidates a part keeps for this top_k (a power of two, at least 16)."""
    return max(16, triton.next_power_of_2(top_k))


def sample_top_k(logits: torch.Tensor, rows: torch.Tensor, u: torch.Tensor, parts: int = PARTS) -> torch.Tensor:
    """logits (B, V) (vocabulary contiguous; bf16 or float32), rows (B, 4) float32 [temperature,
    top_p (2 for none), min_p, top_k (1 .. MAX_K)], u (B, KP) uniform in [0, 1), KP =
    candidates_width(the largest top_k); `parts` a power of two (the interpreter's tests take fewer)
    -> (B,) int64 sampled ids."""
    b, v = logits.shape
    kp = u.shape[1]
    if logits.stride(1) != 1 or not v or kp > MAX_K or kp & (kp - 1) or parts & (parts - 1) \
            or rows.shape != (b, 4):
        raise ValueError(f"sample_top_k: logits {tuple(logits.shape)}, rows {tuple(rows.shape)}, u {tuple(u.shape)}")
    out = torch.empty(b, dtype=torch.int64, device=logits.device)
    if b:
        maxes, sums, chunk, block = _parts(logits, rows, parts)
        keys = torch.empty(b, parts, kp, dtype=torch.int64, device=logits.device)
        _sample_select_kernel[(b, parts)](logits, rows, maxes, keys, v, logits.stride(0), chunk,
                                          BLOCK=block, KP=kp, PARTS=parts, num_warps=_warps(block))
        _sample_pick_kernel[(b,)](keys, maxes, sums, rows, u, out, KP=kp, PARTS=parts, num_warps=4)
    return out


def _warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def _parts(logits: torch.Tensor, rows: torch.Tensor, parts: int):
    """The first launch: each part's maximum and sum of exponentials -> (maxes, sums, chunk, block)."""
    b, v = logits.shape
    chunk = triton.cdiv(v, parts)
    block = triton.next_power_of_2(chunk)
    maxes = torch.empty(b, parts, dtype=torch.float32, device=logits.device)
    sums = torch.empty(b, parts, dtype=torch.float32, device=logits.device)
    _sample_parts_kernel[(b, parts)](logits, rows, maxes, sums, v, logits.stride(0), chunk,
                                     BLOCK=block, PARTS=parts, num_warps=_warps(block))
    return maxes, sums, chunk, block


def row_logsumexp(logits: torch.Tensor, rows: torch.Tensor, parts: int = PARTS) -> torch.Tensor:
    """logits (B, V) (vocabulary contiguous; bf16 or float32), rows (B, 4) as sample_top_k's ->
    (B, 1) float32: each row's log-sum-exp of logits / temperature over the vocabulary, in one
    read of the logits and two launches (torch's path makes float32 copies first). NaN counts as
    -inf, +inf as the largest float (as sample_top_k takes them); a row of -inf gives -inf."""
    b, v = logits.shape
    if logits.stride(1) != 1 or not v or parts & (parts - 1) or rows.shape != (b, 4):
        raise ValueError(f"row_logsumexp: logits {tuple(logits.shape)}, rows {tuple(rows.shape)}")
    out = torch.empty(b, 1, dtype=torch.float32, device=logits.device)
    if b:
        maxes, sums, _, _ = _parts(logits, rows, parts)
        _lse_kernel[(b,)](maxes, sums, out, PARTS=parts, num_warps=1)
    return out


def warm(vocab: int, dtype: torch.dtype, device) -> list[int]:
    """Compile (launch once) the kernels for every candidates width a top_k up to MAX_K takes, and
    row_logsumexp's, so that the first request with a top_k of another width (or past MAX_K) does
    not compile them in its time to first token. -> the widths."""
    widths = sorted({candidates_width(k) for k in range(1, MAX_K + 1)})
    logits = torch.zeros(1, vocab, dtype=dtype, device=device)
    rows = torch.tensor([[1.0, 2.0, 0.0, 1.0]], device=device)
    for kp in widths:
        sample_top_k(logits, rows, torch.zeros(1, kp, device=device))
    row_logsumexp(logits, rows)         # the torch path's candidates (top_k past MAX_K: layers.sampler.candidates)
    return widths
