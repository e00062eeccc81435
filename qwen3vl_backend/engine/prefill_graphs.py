"""CUDA graphs for the prefill of one new sequence, bucketed by token count (time to first token).

An eager prefill queues some thirty kernels a decoder layer from Python, and at a few thousand
tokens the host takes longer to queue them than the GPU to run them (30B-A3B fp8, 954 tokens:
the GPU busy 42.6 ms of an 85 ms first token, H200). Replayed, one 1280x720 image + 64 tokens
reached its first token in 46 ms instead of 94 (fp8) and 57 instead of 89 (bf16); 235B-A22B-FP8
at tp 2 in 126 instead of 396. A step replays a graph when it is one chunk
of one sequence that starts at position 0 (nothing cached before it), samples its next token, asks
no prompt logprobs and fits the largest bucket: the common first request of a conversation.
Everything else (batches of several prompts, chunks after a cached prefix) runs eagerly.

Padding: the tokens past the real ones are id 0 at position 0. They come after every real token,
so causal attention never shows them to a real one; they write their K/V into the scratch block
(the one the block manager never hands out) and their rows are dropped. The MoE routes them like
any token: their cost is the bucket's, which is why the buckets are close together.

Visual rows go in dense (`dense_visual` in models/qwen3_vl.py): the (bucket, D) embeddings and
DeepStack levels are zero off the visual rows, filled here by `masked_scatter_` (no host sync).
Without `capture` (CPU) the same padded forward runs eagerly: tests compare it with the eager path.
"""

from __future__ import annotations

import torch

from kernels import switches

from ..layers.attention import CUDNN_FIRST, AttentionMetadata, sdpa_priority

# every 128 tokens to 2048, then every 256: the padding is at most 128 tokens (<= 7% past 1,800;
# 1836, two 1280x720 images + 64 tokens, had padded to 2048). Captured largest first into one
# pool, the smaller graphs reuse its memory.
DEFAULT_BUCKETS = (*range(128, 2048, 128), *range(2048, 4097, 256))


def buckets_up_to(max_tokens: int) -> list[int]:
    """The default buckets up to `max_tokens`, which is always one (0: none)."""
    if max_tokens <= 0:
        return []
    return sorted({b for b in DEFAULT_BUCKETS if b < max_tokens} | {max_tokens})


class PrefillGraphs:
    def __init__(self, model, kv_caches, block_size: int, scratch_block: int, buckets, device, dtype):
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.buckets = sorted(buckets)
        n, dev = self.buckets[-1], torch.device(device)
        hidden = model.cfg.text.hidden_size
        levels = len(model.cfg.vision.deepstack_visual_indexes)
        self.scratch_slot = scratch_block * block_size
        self.ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(3, n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), self.scratch_slot, dtype=torch.long, device=dev)
        self.last = torch.zeros(1, dtype=torch.long, device=dev)
        self.visual = torch.zeros(n, hidden, dtype=dtype, device=dev)
        self.mask = torch.zeros(n, dtype=torch.bool, device=dev)
        self.deepstack = [torch.zeros(n, hidden, dtype=dtype, device=dev) for _ in range(levels)]
        self._deepstack_dirty = False
        # read by nothing (a fresh sequence attends over its own new keys), present for the metadata
        self.tables = torch.full((1, 1), scratch_block, dtype=torch.int32, device=dev)
        self.context_lens = torch.zeros(1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = 0

    @torch.no_grad()
    def capture(self) -> None:
        """Every bucket's graph. Under switches.PREFILL_CUDNN, SDPA tries cuDNN's attention first:
        the eager passes before each capture plan its length (planning inside a capture fails it)."""
        pool = None
        with sdpa_priority(CUDNN_FIRST if switches.PREFILL_CUDNN else None):
            for b in reversed(self.buckets):            # largest first: the smaller ones share its pool
                for _ in range(2):                       # compile kernels and settle the allocator outside capture
                    self._forward(b)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._forward(b)
                pool = graph.pool()
                self.graphs[b] = (graph, logits)
        torch.cuda.synchronize()

    def _forward(self, b: int) -> torch.Tensor:
        meta = AttentionMetadata([b], [b], self.slots[:b], self.tables, self.block_size, self.context_lens)
        hidden = self.model(self.ids[:b], self.positions[:, :b], self.kv_caches, meta, self.visual[:b],
                            self.mask[:b], [d[:b] for d in self.deepstack], dense_visual=True)
        return self.model.compute_logits(hidden.index_select(0, self.last))

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    @torch.no_grad()
    def run(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, visual=None,
            visual_mask=None, deepstack=()) -> torch.Tensor:
        """Logits (1, V) of the last token of one new sequence's prompt (`fits` said it may)."""
        t = ids.shape[0]
        b = self.bucket(t)
        self.ids[:t].copy_(ids)
        self.ids[t:b].zero_()
        self.positions[:, :t].copy_(positions)
        self.positions[:, t:b].zero_()
        self.slots[:t].copy_(meta.slot_mapping)
        self.slots[t:b].fill_(self.scratch_slot)
        self.last.fill_(t - 1)
        self.mask[:b].zero_()
        if self._deepstack_dirty:                    # a previous prompt's visual rows
            for d in self.deepstack:
                d.zero_()
            self._deepstack_dirty = False
        if visual is not None and visual.shape[0]:
            self.mask[:t].copy_(visual_mask)
            rows = self.mask[:t, None]
            self.visual[:t].masked_scatter_(rows, visual.to(self.visual.dtype))
            for d, level in zip(self.deepstack, deepstack):
                d[:t].masked_scatter_(rows, level.to(d.dtype))
            self._deepstack_dirty = bool(deepstack)
        self.replays += 1
        if b in self.graphs:
            graph, logits = self.graphs[b]
            graph.replay()
            return logits
        return self._forward(b)                     # not captured (CPU): the same padded computation

    def fits(self, batch_tokens: int) -> bool:
        return batch_tokens <= self.buckets[-1]
