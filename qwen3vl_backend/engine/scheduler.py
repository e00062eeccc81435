"""Continuous batching with a token budget per step, chunked prefill and preemption. No torch.

Each step, running sequences go first in arrival order: a decoding sequence takes one token, a
sequence still prefilling takes the next chunk that fits the budget. Then waiting sequences are
admitted (after a prefix-cache lookup) while the budget, the sequence cap and the free blocks
allow. When blocks run out, the most recently admitted running sequence is preempted: its blocks
are freed and it goes back to the front of the queue to be recomputed later, never failed.

`solo_prefill` (lo, hi): a waiting prompt of lo..hi tokens is prefilled in a step of its own, ahead
of the decoding sequences, which wait for it (SGLang's default: prefill batches apart from decode
batches). Whole prompts from position 0 are what the model runner replays a prefill graph for
(hi: its largest bucket); packed two to a 2048-token step with decode rows, the prompts of a burst
ran eagerly and were cut at the budget (30B fp8: 16 image requests at once, first tokens after
1.2-1.8 s). The prompts queued behind the first that also qualify join its step, up to
`solo_pack` of them and `solo_pack_tokens` (and hi) tokens in all (the runner's packed graphs),
as long as each is fresh (no prefix-cache hit: a cached prefix is read eagerly). At most
`max_solo_streak` such steps run in a row while sequences wait to decode; then a step of the
decoding sequences alone, and the solo steps go on.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence, Status


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int          # first token index computed this step
    num_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the sequence's last token (so its logits are sampled)."""
        return self.start + self.num_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 solo_prefill: tuple[int, int] | None = None, max_solo_streak: int = 16, solo_pack: int = 1,
                 solo_pack_tokens: int | None = None):
        if max_num_seqs <= 0 or max_num_batched_tokens <= 0 or max_solo_streak <= 0 or solo_pack <= 0:
            raise ValueError("max_num_seqs, max_num_batched_tokens, max_solo_streak and solo_pack must be positive")
        self.solo_pack, self.solo_pack_tokens = solo_pack, solo_pack_tokens
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.solo_prefill, self.max_solo_streak, self._streak = solo_prefill, max_solo_streak, 0
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        if self.bm.blocks_for(seq.num_prompt + 1) > self.bm.num_blocks:
            raise ValueError(f"prompt of {seq.num_prompt} tokens does not fit the KV cache "
                             f"({self.bm.num_blocks} blocks of {self.bm.block_size})")
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Sequence | None:
        for seq in list(self.running) + list(self.waiting):
            if seq.request_id == request_id:
                self.finish(seq, "abort")
                return seq
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def schedule(self) -> list[ScheduledChunk]:
        hold = False            # a streak's end: a step of the decoding sequences alone, then the solo steps go on
        if self._solo_eligible():
            decoding = any(not s.finishing for s in self.running)
            if self._streak < self.max_solo_streak or not decoding:
                chunk = self._admit(self.waiting[0].num_prompt)
                if chunk is not None:
                    self._streak += 1
                    return self._pack(chunk)
            hold = decoding and self._streak >= self.max_solo_streak
        budget = self.max_num_batched_tokens
        batch: list[ScheduledChunk] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.finishing:
                i += 1
                continue
            n = min(seq.remaining, budget)
            while not self.bm.ensure(seq, seq.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break
            batch.append(ScheduledChunk(seq, seq.num_computed, n))
            budget -= n
            i += 1
        while not hold and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            chunk = self._admit(budget)
            if chunk is None:
                break
            batch.append(chunk)
            budget -= chunk.num_tokens
        self._streak = 0
        return batch

    def _pack(self, first: ScheduledChunk) -> list[ScheduledChunk]:
        """A solo step: `first`, and the waiting prompts behind it that qualify too (fresh, in
        range, within solo_pack and solo_pack_tokens), in their order."""
        batch, tokens = [first], first.num_tokens
        hi = min(self.solo_prefill[1], self.max_num_batched_tokens)
        if self.solo_pack_tokens is not None:          # (0: no packing)
            hi = min(hi, self.solo_pack_tokens)
        while (first.start == 0 and len(batch) < self.solo_pack and self.waiting
               and len(self.running) < self.max_num_seqs and self._solo_prompt(self.waiting[0])
               and tokens + self.waiting[0].num_prompt <= hi):
            chunk = self._admit(self.waiting[0].num_prompt, fresh_only=True)
            if chunk is None:
                break
            batch.append(chunk)
            tokens += chunk.num_tokens
        return batch

    def _admit(self, budget: int, fresh_only: bool = False) -> ScheduledChunk | None:
        """The first waiting sequence's next chunk within `budget`, now running; None (and no
        change) when the blocks for it are not free, or (`fresh_only`) when part of it is cached."""
        seq = self.waiting[0]
        counters = None
        # prompt logprobs need every prompt position's logits: no prefix-cache hit for them
        if seq.num_computed == 0 and not seq.block_table and seq.params.prompt_logprobs is None:
            counters = self.bm.prefix_queries, self.bm.prefix_hits
            seq.num_computed = seq.num_cached_prompt = self.bm.match_prefix(seq)
        n = min(seq.remaining, budget)
        if (fresh_only and seq.num_computed) or not self.bm.ensure(seq, seq.num_computed + n):
            self.bm.free(seq)
            seq.num_computed = seq.num_cached_prompt = 0
            if counters is not None:        # looked up again, and counted, when it is admitted
                self.bm.prefix_queries, self.bm.prefix_hits = counters
            return None
        self.waiting.popleft()
        seq.status = Status.RUNNING
        self.running.append(seq)
        return ScheduledChunk(seq, seq.num_computed, n)

    def _solo_eligible(self) -> bool:
        """Whether the first waiting prompt takes a solo_prefill step: a fresh prompt in the
        range, a free sequence slot, and no prompt still prefilling in chunks (those go on in
        regular steps)."""
        if self.solo_prefill is None or not self.waiting or len(self.running) >= self.max_num_seqs:
            return False
        return (self._solo_prompt(self.waiting[0])
                and not any(not s.finishing and s.num_computed < s.num_prompt for s in self.running))

    def _solo_prompt(self, seq: Sequence) -> bool:
        """A fresh prompt of solo_prefill's range (a preempted sequence recomputes as before)."""
        lo, hi = self.solo_prefill
        return (lo <= seq.num_prompt <= min(hi, self.max_num_batched_tokens) and not seq.num_computed
                and seq.num_tokens == seq.num_prompt)

    def computed(self, batch: list[ScheduledChunk]) -> None:
        """Record that the batch's tokens are now in the cache."""
        for chunk in batch:
            chunk.seq.num_computed = chunk.start + chunk.num_tokens
            self.bm.register(chunk.seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
