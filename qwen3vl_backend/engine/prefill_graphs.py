"""CUDA graphs for the prefill of new sequences, bucketed by token count (time to first token).

An eager prefill queues some thirty kernels a decoder layer from Python, and at a few thousand
tokens the host takes longer to queue them than the GPU to run them (30B-A3B fp8, 954 tokens:
the GPU busy 42.6 ms of an 85 ms first token, H200). Replayed, one 1280x720 image + 64 tokens
reached its first token in 46 ms instead of 94 (fp8) and 57 instead of 89 (bf16); 235B-A22B-FP8
at tp 2 in 126 instead of 396. A step replays a graph when each of its chunks is a whole prompt
of a sequence that starts at position 0 (nothing cached before it) and samples its next token,
none asks prompt logprobs, and they fit the largest bucket: the first requests of
conversations. Chunks after a cached prefix, and batches with decode rows, run eagerly.

One prompt replays its bucket's graph, whose attention is SDPA's (cuDNN's where it serves).
Several (up to `max_seqs`) replay a packed graph: the same model over their concatenated tokens,
attention causal within each prompt (qwen3vl_kernels.varlen_attention, its segment table `cu` a device
buffer), the logits of each prompt's last token. Up to about a thousand tokens a step costs
about what reading the weights costs, so short prompts share one nearly free (30B-A3B fp8 on an
H200: ~11 ms at 128 tokens, ~17.6 at 1024, ~30 at 2048; NOTES, thirty-first session).

Padding: the tokens past the real ones are id 0 at position 0. They come after every real token,
so no real token attends to them (one prompt: causal; packed: a segment of their own); they
write their K/V into the scratch block (the one the block manager never hands out) and their
rows are dropped. The MoE routes them like any token: their cost is the bucket's, which is why
the buckets are close together.

Visual rows go in dense (`dense_visual` in models/qwen3_vl.py): the (bucket, D) embeddings and
DeepStack levels are zero off the visual rows, filled here by `masked_scatter_` (no host sync).
Without `capture` (CPU) the same padded forward runs eagerly: tests compare it with the eager path.
"""

from __future__ import annotations

import itertools

import torch

from qwen3vl_kernels import switches

from ..device import device_tensor
from ..layers.attention import CUDNN_FIRST, AttentionMetadata, sdpa_priority

# every 128 tokens to 2048, then every 256: the padding is at most 128 tokens (<= 7% past 1,800;
# 1836, two 1280x720 images + 64 tokens, had padded to 2048). Captured largest first into one
# pool, the smaller graphs reuse its memory.
DEFAULT_BUCKETS = (*range(128, 2048, 128), *range(2048, 4097, 256))


# the packed graphs' buckets: every 256 tokens (half as many graphs to capture as one prompt's; a
# pack of two 954-token prompts pads 1908 to 2048)
PACKED_MIN, PACKED_STEP = 256, 256


def buckets_up_to(max_tokens: int) -> list[int]:
    """The default buckets up to `max_tokens`, which is always one (0: none)."""
    if max_tokens <= 0:
        return []
    return sorted({b for b in DEFAULT_BUCKETS if b < max_tokens} | {max_tokens})


def packed_buckets(buckets) -> list[int]:
    """The packed graphs' buckets among `buckets`: every PACKED_STEP from PACKED_MIN, and the largest."""
    return sorted({b for b in buckets if b >= PACKED_MIN and b % PACKED_STEP == 0} | {max(buckets)})


class PrefillGraphs:
    def __init__(self, model, kv_caches, block_size: int, scratch_block: int, buckets, device, dtype,
                 max_seqs: int = 1):
        if max_seqs < 1:
            raise ValueError(f"prefill graphs: max_seqs {max_seqs} must be at least 1")
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.buckets = sorted(buckets)
        self.max_seqs = max_seqs
        self.packed_buckets = packed_buckets(self.buckets) if max_seqs > 1 else []
        n, dev = self.buckets[-1], torch.device(device)
        hidden = model.cfg.text.hidden_size
        levels = len(model.cfg.vision.deepstack_visual_indexes)
        self.scratch_slot = scratch_block * block_size
        self.ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(3, n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), self.scratch_slot, dtype=torch.long, device=dev)
        self.last = torch.zeros(max_seqs, dtype=torch.long, device=dev)     # each prompt's last row
        # the packed graphs' segments: the prompts, the padding, then empty ones (max_seqs + 1 in all)
        self.cu = torch.zeros(max_seqs + 2, dtype=torch.int32, device=dev)
        self.visual = torch.zeros(n, hidden, dtype=dtype, device=dev)
        self.mask = torch.zeros(n, dtype=torch.bool, device=dev)
        self.deepstack = [torch.zeros(n, hidden, dtype=dtype, device=dev) for _ in range(levels)]
        self._deepstack_dirty = False
        # read by nothing (a fresh sequence attends over its own new keys), present for the metadata
        self.tables = torch.full((1, 1), scratch_block, dtype=torch.int32, device=dev)
        self.context_lens = torch.zeros(1, dtype=torch.int32, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.packed: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = self.packed_replays = 0

    @torch.no_grad()
    def capture(self) -> None:
        """Every bucket's graph, one prompt's and packed. Under switches.PREFILL_CUDNN, SDPA tries
        cuDNN's attention first: the eager passes before each capture plan its length (planning
        inside a capture fails it)."""
        pool = None
        todo = sorted([(b, False) for b in self.buckets] + [(b, True) for b in self.packed_buckets], reverse=True)
        with sdpa_priority(CUDNN_FIRST if switches.PREFILL_CUDNN else None):
            for b, packed in todo:                      # largest first: the smaller ones share its pool
                if packed:                              # one segment of the whole bucket while capturing
                    self.cu.fill_(b)
                    self.cu[0] = 0
                for _ in range(2):                       # compile kernels and settle the allocator outside capture
                    self._forward(b, packed)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._forward(b, packed)
                pool = graph.pool()
                (self.packed if packed else self.graphs)[b] = (graph, logits)
        torch.cuda.synchronize()

    def _forward(self, b: int, packed: bool) -> torch.Tensor:
        meta = AttentionMetadata([b], [b], self.slots[:b], self.tables, self.block_size, self.context_lens,
                                 cu_seqlens_t=self.cu if packed else None, max_query_len=b)
        hidden = self.model(self.ids[:b], self.positions[:, :b], self.kv_caches, meta, self.visual[:b],
                            self.mask[:b], [d[:b] for d in self.deepstack], dense_visual=True)
        return self.model.compute_logits(hidden.index_select(0, self.last if packed else self.last[:1]))

    def bucket(self, n: int, seqs: int = 1) -> int | None:
        return next((b for b in (self.buckets if seqs == 1 else self.packed_buckets) if b >= n), None)

    @torch.no_grad()
    def run(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, visual=None,
            visual_mask=None, deepstack=()) -> torch.Tensor:
        """Logits (S, V) of the last token of each new sequence's prompt, S = len(meta.query_lens)
        (`fits` said they may)."""
        t, seqs = ids.shape[0], len(meta.query_lens)
        b = self.bucket(t, seqs)
        self.ids[:t].copy_(ids)
        self.ids[t:b].zero_()
        self.positions[:, :t].copy_(positions)
        self.positions[:, t:b].zero_()
        self.slots[:t].copy_(meta.slot_mapping)
        self.slots[t:b].fill_(self.scratch_slot)
        if seqs == 1:
            self.last[:1].fill_(t - 1)
        else:           # the prompts, the padding's segment (empty where there is none), then empty ones
            ends = list(itertools.accumulate(meta.query_lens))
            cu = [0, *ends, *[b] * (self.max_seqs + 1 - seqs)]
            self.cu.copy_(device_tensor(cu, torch.int32, self.cu.device), non_blocking=True)
            # the rows past the prompts' read the padding's last row (dropped)
            self.last.copy_(device_tensor([e - 1 for e in ends] + [b - 1] * (self.max_seqs - seqs), torch.long,
                                          self.last.device), non_blocking=True)
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
        if seqs > 1:
            self.packed_replays += 1
            graph, logits = self.packed.get(b) or (None, None)
        else:
            self.replays += 1
            graph, logits = self.graphs.get(b) or (None, None)
        if graph is None:                           # not captured (CPU): the same padded computation
            logits = self._forward(b, seqs > 1)
        else:
            graph.replay()
        return logits[:seqs]

    def fits(self, batch_tokens: int, seqs: int = 1) -> bool:
        return 1 <= seqs <= self.max_seqs and batch_tokens <= self.buckets[-1]
