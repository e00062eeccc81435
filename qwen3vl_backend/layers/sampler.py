"""Token sampling: penalties, temperature, top-k / top-p / min-p, per-request seeded draws.

A seeded request draws from its own generator, so its tokens do not depend on what else is in
the batch. Greedy (temperature 0) is an argmax over the penalised logits. The sampled ids stay
on the logits' device: nothing here waits for the GPU, so the engine can prepare the next step
while this one runs.
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import torch

from ..device import device_tensor
from ..sampling_params import SamplingParams


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int],
                    output_ids: list[int]) -> torch.Tensor:
    """logits (V,) float32, adjusted in place as vLLM/OpenAI define the three penalties. The ids
    and counts are found on the host and queued from pinned memory: nothing here waits for the
    GPU (the forward of the step being sampled may still be running)."""
    dev = logits.device
    if params.repetition_penalty != 1.0:
        seen = device_tensor(sorted(set(prompt_ids) | set(output_ids)), torch.long, dev)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        counts = Counter(output_ids)
        ids = device_tensor(list(counts), torch.long, dev)
        logits[ids] -= params.presence_penalty + params.frequency_penalty * device_tensor(list(counts.values()),
                                                                                         logits.dtype, dev)
    return logits


def filter_probs(probs: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """probs (V,) -> renormalised probs after top-k, top-p and min-p, over the whole vocabulary: the
    definition `candidates` draws from (the tests' reference; a top-k tie here keeps every tied token)."""
    if params.top_k and params.top_k > 0 and params.top_k < probs.shape[-1]:
        kth = torch.topk(probs, params.top_k).values[-1]
        probs = torch.where(probs < kth, torch.zeros_like(probs), probs)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cum = sorted_p.cumsum(0)
        drop = (cum - sorted_p) >= params.top_p        # keep the smallest prefix reaching top_p
        drop[0] = False                                # and always the most likely token
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    if params.min_p > 0:
        probs = torch.where(probs < params.min_p * probs.max(), torch.zeros_like(probs), probs)
    return _safe_probs(probs[None])[0]


def _safe_probs(probs: torch.Tensor) -> torch.Tensor:
    """Rows (B, V) renormalised for multinomial. A row that lost all its mass (non-finite logits
    from a broken input) puts it on its largest entry: one request's garbage must not raise in,
    or on a GPU assert inside, the draw of the batch it shares."""
    probs = torch.nan_to_num(probs, nan=0.0, posinf=0.0, neginf=0.0).clamp_(min=0.0)
    total = probs.sum(-1, keepdim=True)
    empty = total <= 0                       # no host sync: the step must stay queued
    top = torch.zeros_like(probs).scatter_(-1, probs.argmax(-1, keepdim=True), 1.0)
    return torch.where(empty, top, probs / torch.where(empty, torch.ones_like(total), total))


def _plain_greedy(params: SamplingParams) -> bool:
    return (params.greedy and params.repetition_penalty == 1.0
            and not params.presence_penalty and not params.frequency_penalty)


def _plain_sampling(params: SamplingParams) -> bool:
    return (not params.greedy and params.seed is None and params.repetition_penalty == 1.0
            and not params.presence_penalty and not params.frequency_penalty)


def ban_tokens(logits: torch.Tensor, banned: list) -> torch.Tensor:
    """logits (B, V) with -inf at each row's banned ids (banned[i]: a set, or None), in one op and
    out of place (the caller's logits stay raw for logprobs)."""
    pairs = [(i, t) for i, b in enumerate(banned) if b for t in b]
    if not pairs:
        return logits
    index = device_tensor(pairs, torch.long, logits.device)
    # the value made on the device (a tensor from a Python number would be a blocking copy)
    return logits.index_put((index[:, 0], index[:, 1]), logits.new_full((), float("-inf")))


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's first maximal index (int64): qwen3vl_kernels.argmax on a GPU (qwen3vl_kernels.switches.ARGMAX_KERNEL),
    else torch's."""
    if logits.is_cuda and logits.stride(-1) == 1:
        from qwen3vl_kernels import switches

        if switches.ARGMAX_KERNEL:
            from qwen3vl_kernels.argmax import argmax_rows

            return argmax_rows(logits)
    return logits.argmax(dim=-1)


def needs_history(params: SamplingParams) -> bool:
    """Whether sampling reads the tokens generated so far (so the previous step must be known)."""
    return params.repetition_penalty != 1.0 or bool(params.presence_penalty) or bool(params.frequency_penalty)


# rows whose top_k is at most this take their candidates from torch.topk over the vocabulary, not
# from a sort of it (a sort of 151,936 float32 costs far more than a top-20 on a GPU)
TOPK_CANDIDATES = 1024


def _top_ks(params: list[SamplingParams], vocab: int) -> list[int]:
    """Each row's top_k as a count of candidates: clamped to the vocabulary; off (0, -1) is all of it."""
    return [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]


def _filter_rows(params: list[SamplingParams], ks: list[int], device) -> torch.Tensor:
    """The rows' filters in one copy to the device, (B, 4) float32: temperature, top_p (2 for none:
    1 keeps everything), min_p, top_k (`ks`). What `candidates` and qwen3vl_kernels.sample read."""
    return device_tensor([[p.temperature, p.top_p if p.top_p < 1.0 else 2.0, p.min_p, k] for p, k in zip(params, ks)],
                         torch.float32, device)


def candidates(logits: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits (B, V) (bf16 or float32) -> (probs (B, K) float32, ids (B, K)): each row's K most
    likely tokens, most likely first, with their probabilities under temperature (of the whole
    vocabulary's softmax, as `filter_probs` takes them) where top-k, top-p and min-p keep them and
    0 where they drop. K is the largest top_k of the rows when every row has one up to
    TOPK_CANDIDATES, else the vocabulary (sorted). Those K come from a top-k of the logits in their
    own dtype (a positive temperature keeps the order), the softmax's denominator from the
    log-sum-exp of the whole row (`_logsumexp`). A top-k tie at the K-th place keeps exactly K.
    Rows that filter nothing give the softmax and ids None (the vocabulary in order). Nothing
    waits for the device."""
    dev, vocab = logits.device, logits.shape[-1]
    ks = _top_ks(params, vocab)
    k = max(ks)
    rows = _filter_rows(params, ks, dev)
    if k == vocab and all(p.top_p >= 1.0 and not p.min_p for p in params):   # no filter: no sort
        return torch.softmax(logits.float() / rows[:, :1], dim=-1), None
    if k <= TOPK_CANDIDATES:
        vals, ids = logits.topk(k, dim=-1)
        probs = torch.exp(_scaled(vals, rows) - _logsumexp(logits, rows))
    else:
        probs, ids = torch.softmax(logits.float() / rows[:, :1], dim=-1).sort(dim=-1, descending=True)
    rank = torch.arange(probs.shape[-1], device=dev, dtype=torch.float32)[None, :]
    drop = ((rank >= rows[:, 3:4]) | ((probs.cumsum(-1) - probs) >= rows[:, 1:2])
            | (probs < rows[:, 2:3] * probs[:, :1]))
    drop[:, 0] = False                      # the most likely token always stays (top_p near 0)
    return probs.masked_fill(drop, 0.0), ids


def _logsumexp(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B, 1) float32: each row's log-sum-exp of logits / temperature (rows[:, 0]) over the
    vocabulary. On a GPU qwen3vl_kernels.sample.row_logsumexp, one read of the logits in their dtype (at
    128 rows of 151,936 torch's path first wrote two float32 copies of 78 MB); else torch's, with
    the same treatment of NaN (-inf) and +inf (the largest float)."""
    if logits.is_cuda and logits.stride(-1) == 1:
        from qwen3vl_kernels.sample import row_logsumexp

        return row_logsumexp(logits, rows)
    return torch.logsumexp(_scaled(logits, rows), dim=-1, keepdim=True)


def _scaled(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x / temperature in float32, NaN as -inf and +inf as the largest float (as qwen3vl_kernels.sample
    takes them: a row's +inf then holds its whole mass, and NaN none)."""
    return (x.float() / rows[:, :1]).nan_to_num(nan=float("-inf"), posinf=torch.finfo(torch.float32).max,
                                                neginf=float("-inf"))


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """probs (B, K) non-negative, each row with some mass -> one index a row, drawn in proportion:
    the largest p / E over E ~ Exp(1) (an exponential race; multinomial's own one-sample path,
    without its checks, which may wait for the device). E is kept off 0, so a dropped token (p 0)
    is never picked."""
    e = torch.empty_like(probs).exponential_(generator=generator).clamp_(min=1e-30)
    return (probs / e).argmax(dim=-1)


def kernel_top_k(params: list[SamplingParams], vocab: int) -> int:
    """The largest top_k where qwen3vl_kernels.sample would draw this batch on a GPU (rows each with a
    top_k up to its MAX_K; qwen3vl_kernels.switches.SAMPLE_KERNEL on), else 0."""
    from qwen3vl_kernels import switches
    from qwen3vl_kernels.sample import MAX_K

    if not switches.SAMPLE_KERNEL or not params or any(p.top_k <= 0 for p in params):
        return 0
    k = max(_top_ks(params, vocab))
    return k if k <= MAX_K else 0


def sample_batch(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """One draw per row from the same distribution `filter_probs` gives, for the whole batch at once:
    qwen3vl_kernels.sample's three launches where `kernel_top_k` allows (the logits in their own dtype),
    else `candidates`, then one race over them."""
    k = kernel_top_k(params, logits.shape[-1]) if logits.is_cuda and logits.stride(-1) == 1 else 0
    if k:
        from qwen3vl_kernels.sample import candidates_width, sample_top_k

        rows = _filter_rows(params, _top_ks(params, logits.shape[-1]), logits.device)
        return sample_top_k(logits, rows, torch.rand(len(params), candidates_width(k), device=logits.device))
    probs, ids = candidates(logits, params)
    picked = draw(_safe_probs(probs))
    return picked if ids is None else ids.gather(1, picked[:, None]).squeeze(1)


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, params: list[SamplingParams]):
    """For rows whose params ask for logprobs: the model's log-softmax (raw: before penalties,
    temperature and top-k/p, as vLLM reports by default) at the sampled id, and the top K
    alternatives (K the most any row asked). -> (chosen (B,), top values (B, K), top ids (B, K))
    on the device, or None when no row asks."""
    k = max((p.logprobs for p in params if p.logprobs is not None), default=None)
    if k is None:
        return None
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, ids[:, None].long())[:, 0]
    vals, top = lp.topk(k, dim=-1) if k else (lp[:, :0], ids[:, None][:, :0])
    return chosen, vals, top


class SampleRow(NamedTuple):
    """One sequence as the sampler sees it."""
    request_id: str
    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    banned_ids: set[int] | None = None      # never sampled (a structured-output mask's refusals)


class Sampler:
    def __init__(self):
        self._generators: dict[str, torch.Generator] = {}
        # a request's logit_bias as (token ids, values) on the device, made at its first step: up to
        # MAX_LOGIT_BIAS pairs a request are not rebuilt from Python each step
        self._bias: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def forget(self, request_id: str) -> None:
        self._generators.pop(request_id, None)
        self._bias.pop(request_id, None)

    def bias_and_ban(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        """logits (B, V) with each row's logit_bias added (in float32) and then its banned ids at
        -inf (ban_tokens), out of place; the logits themselves where no row has either."""
        biased = [(i, r) for i, r in enumerate(rows) if r.params.logit_bias]
        if biased:
            parts = [self._bias_of(r, logits.device) for _, r in biased]
            counts = [len(ids) for ids, _ in parts]
            where = device_tensor([i for i, _ in biased], torch.long, logits.device)
            row = torch.repeat_interleave(where, device_tensor(counts, torch.long, logits.device),
                                          output_size=sum(counts))      # known here: no host sync
            ids, values = (torch.cat(x) for x in zip(*parts))
            logits = logits.float().index_put((row, ids), values, accumulate=True)
        return ban_tokens(logits, [r.banned_ids for r in rows])

    def _bias_of(self, row: SampleRow, device) -> tuple[torch.Tensor, torch.Tensor]:
        if row.request_id not in self._bias:
            bias = row.params.logit_bias
            self._bias[row.request_id] = (device_tensor(list(bias), torch.long, device),
                                          device_tensor(list(bias.values()), torch.float32, device))
        return self._bias[row.request_id]

    def sample(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        """logits (B, V), a row each -> the B sampled ids (int64) on the logits' device."""
        if all(_plain_greedy(r.params) for r in rows):           # the common serving case: one argmax
            # in the logits' own dtype: float32 holds each bf16 value exactly, so the same argmax
            return argmax(self.bias_and_ban(logits, rows))
        batched = [i for i, r in enumerate(rows) if _plain_sampling(r.params)]
        if len(batched) == len(rows):                     # unseeded, no penalties: one batched draw
            return sample_batch(self.bias_and_ban(logits, rows), [r.params for r in rows])
        logits = self.bias_and_ban(logits.float(), rows)
        out = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        if batched:
            index = device_tensor(batched, torch.long, logits.device)
            out[index] = sample_batch(logits[index], [rows[i].params for i in batched])
        done = set(batched)
        # a seeded request's stream must not move on a draw whose step then failed: the engine
        # retries the step without the request that broke it, and the others draw again
        saved = {r.request_id: g.get_state() for r in rows if (g := self._generators.get(r.request_id)) is not None}
        try:
            for i, (rid, params, prompt_ids, output_ids, _) in enumerate(rows):
                if i in done:
                    continue
                row = apply_penalties(logits[i].clone(), params, prompt_ids, output_ids)
                if params.greedy:
                    out[i] = row.argmax()
                    continue
                probs, ids = candidates(row[None], [params])
                picked = draw(_safe_probs(probs), self._generator(rid, params, row.device))
                out[i] = (picked if ids is None else ids.gather(1, picked[:, None])[:, 0])[0]
        except Exception:
            for rid, state in saved.items():
                self._generators[rid].set_state(state)
            for rid in {r.request_id for r in rows} - set(saved):
                self._generators.pop(rid, None)
            raise
        return out

    def _generator(self, rid: str, params: SamplingParams, device) -> torch.Generator | None:
        if params.seed is None:
            return None
        if rid not in self._generators:
            self._generators[rid] = torch.Generator(device=device).manual_seed(params.seed)
        return self._generators[rid]
