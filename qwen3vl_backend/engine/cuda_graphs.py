"""CUDA graphs for decode steps: one graph per batch size, replayed over static input buffers.

A decode batch of n sequences runs the graph of the smallest captured size >= n. The padding
rows write their K/V into a scratch block that the block manager never hands out, attend over
one token of it, and their logits are dropped. Only steps where every sequence decodes one token
with no visual rows use a graph; everything else runs eagerly.
"""

from __future__ import annotations

import torch

from ..layers.attention import AttentionMetadata

DEFAULT_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)


class DecodeGraphs:
    def __init__(self, model, kv_caches, block_size: int, max_blocks_per_seq: int, scratch_block: int,
                 sizes=DEFAULT_SIZES, device="cuda"):
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.sizes = sorted(sizes)
        n, dev = self.sizes[-1], torch.device(device)
        self.ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(3, n, dtype=torch.long, device=dev)
        self.scratch_block, self.scratch_slot = scratch_block, scratch_block * block_size
        self.slots = torch.full((n,), self.scratch_slot, dtype=torch.long, device=dev)
        self.tables = torch.full((n, max_blocks_per_seq), scratch_block, dtype=torch.int32, device=dev)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    @torch.no_grad()
    def capture(self) -> None:
        pool = None
        for bs in reversed(self.sizes):             # largest first: smaller ones reuse its memory pool
            meta = self._meta(bs)
            for _ in range(2):                       # compile kernels and settle the allocator outside capture
                self._forward(bs, meta)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._forward(bs, meta)
            pool = graph.pool()
            self.graphs[bs] = (graph, logits)
        torch.cuda.synchronize()

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata([1] * bs, [1] * bs, self.slots[:bs], self.tables[:bs], self.block_size,
                                 self.context_lens[:bs])

    def _forward(self, bs: int, meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.model(self.ids[:bs], self.positions[:, :bs], self.kv_caches, meta)
        return self.model.compute_logits(hidden)

    def fits(self, n: int) -> bool:
        return bool(self.graphs) and n <= self.sizes[-1]

    @torch.no_grad()
    def run(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Logits (n, V) for a decode-only batch of n sequences."""
        n = ids.shape[0]
        bs = next(s for s in self.sizes if s >= n)
        graph, logits = self.graphs[bs]
        width = meta.block_tables.shape[1]
        self.ids[:n].copy_(ids)
        self.positions[:, :n].copy_(positions)
        self.slots[:n].copy_(meta.slot_mapping)
        self.tables[:n, :width].copy_(meta.block_tables)
        self.context_lens[:n].copy_(meta.context_lens_t)
        if bs > n:                                   # the previous replay may have left real rows here
            self.slots[n:bs].fill_(self.scratch_slot)
            self.tables[n:bs, 0].fill_(self.scratch_block)
            self.context_lens[n:bs].fill_(1)
        graph.replay()
        return logits[:n]
