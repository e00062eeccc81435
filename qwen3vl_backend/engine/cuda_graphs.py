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


def _vector_bytes(bs: int) -> int:
    return bs * (8 + 3 * 8 + 4)


def _vector_views(buf: torch.Tensor, bs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A size's per-row inputs in one byte buffer: slots (bs,) and positions (3, bs) int64, then
    context lengths (bs,) int32."""
    return (buf[: 8 * bs].view(torch.int64), buf[8 * bs : 32 * bs].view(torch.int64).view(3, bs),
            buf[32 * bs : 36 * bs].view(torch.int32))


class DecodeGraphs:
    def __init__(self, model, kv_caches, block_size: int, max_blocks_per_seq: int, scratch_block: int,
                 sizes=DEFAULT_SIZES, device="cuda"):
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.sizes = sorted(sizes)
        n, dev = self.sizes[-1], torch.device(device)
        self.ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.scratch_block, self.scratch_slot = scratch_block, scratch_block * block_size
        self.tables = torch.full((n, max_blocks_per_seq), scratch_block, dtype=torch.int32, device=dev)
        # each size's slots, positions and context lengths in one buffer of its own, so that a
        # decode step's (padding rows included) reach the device in one copy (run_host); the
        # buffer and its three views, made once
        self.vectors: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for bs in self.sizes:
            buf = torch.empty(_vector_bytes(bs), dtype=torch.uint8, device=dev)
            slots, positions, context_lens = _vector_views(buf, bs)
            slots.fill_(self.scratch_slot)
            positions.zero_()
            context_lens.fill_(1)
            self.vectors[bs] = (buf, slots, positions, context_lens)
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
        _, slots, _, context_lens = self.vectors[bs]
        return AttentionMetadata([1] * bs, [1] * bs, slots, self.tables[:bs], self.block_size, context_lens)

    def _forward(self, bs: int, meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.model(self.ids[:bs], self.vectors[bs][2], self.kv_caches, meta)
        return self.model.compute_logits(hidden)

    def fits(self, n: int) -> bool:
        return bool(self.graphs) and n <= self.sizes[-1]

    def _size(self, n: int) -> int:
        return next(s for s in self.sizes if s >= n)

    @torch.no_grad()
    def run(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Logits (n, V) for a batch of n one-token rows whose inputs are on the device."""
        n = ids.shape[0]
        bs = self._size(n)
        graph, logits = self.graphs[bs]
        _, slots, pos, context_lens = self.vectors[bs]
        width = meta.block_tables.shape[1]
        self.ids[:n].copy_(ids)
        pos[:, :n].copy_(positions)
        slots[:n].copy_(meta.slot_mapping)
        self.tables[:n, :width].copy_(meta.block_tables)
        context_lens[:n].copy_(meta.context_lens_t)
        if bs > n:                                   # the previous replay may have left real rows here
            slots[n:].fill_(self.scratch_slot)
            self.tables[n:bs, 0].fill_(self.scratch_block)
            context_lens[n:].fill_(1)
        graph.replay()
        return logits[:n]

    @torch.no_grad()
    def run_host(self, ids: torch.Tensor, slots: list[int], positions: list[int], context_lens: list[int],
                 tables: list[list[int]]) -> torch.Tensor:
        """`run` for decode rows given as host lists (positions: one id a row, the same on the three
        mRoPE axes; ids on the device): the slots, positions and context lengths in one copy from
        pinned memory, padding rows included, the block tables in another, the ids in a third."""
        n = len(slots)
        bs = self._size(n)
        graph, logits = self.graphs[bs]
        pad = bs - n
        pinned = self.ids.is_cuda                  # (off a GPU only in tests, with replay stood in)
        host = torch.empty(_vector_bytes(bs), dtype=torch.uint8, pin_memory=pinned)
        h_slots, h_pos, h_lens = _vector_views(host, bs)
        h_slots.copy_(torch.tensor(slots + [self.scratch_slot] * pad, dtype=torch.int64))
        h_pos.copy_(torch.tensor(positions + [0] * pad, dtype=torch.int64).expand(3, -1))
        h_lens.copy_(torch.tensor(context_lens + [1] * pad, dtype=torch.int32))
        self.vectors[bs][0].copy_(host, non_blocking=True)
        width = max(len(t) for t in tables)
        rows = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32)
        rows = rows.pin_memory() if pinned else rows
        self.tables[:n, :width].copy_(rows, non_blocking=True)
        if pad:                                      # the previous replay may have left real rows here
            self.tables[n:bs, 0].fill_(self.scratch_block)
        self.ids[:n].copy_(ids)
        graph.replay()
        return logits[:n]
