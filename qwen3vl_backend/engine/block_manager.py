"""Paged KV cache bookkeeping with prefix caching. Plain Python: no torch.

Blocks hold `block_size` tokens. A full prompt block is named by a hash chained over the blocks
before it and its tokens' cache keys (token ids, or media content hashes for vision tokens), so
two prompts share a block only when everything up to its end is identical, images included.
Blocks nobody references stay findable by hash until evicted (least recently freed first).
"""

from __future__ import annotations

from collections import OrderedDict, deque

from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_cache: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_cache = enable_prefix_cache
        self._free: deque[int] = deque(range(num_blocks))
        self._ref = [0] * num_blocks
        self._hash_of: dict[int, int] = {}              # block -> hash
        self._by_hash: dict[int, int] = {}              # hash -> block
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.prefix_queries = 0                         # prompt tokens looked up
        self.prefix_hits = 0                            # of which served from cache

    # -- capacity ----------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache ------------------------------------------------------------------------
    def _block_hashes(self, seq: Sequence, num_tokens: int) -> list[int]:
        keys = seq.cache_keys if seq.cache_keys is not None else seq.prompt_ids
        out, h = [], 0
        for b in range(num_tokens // self.block_size):
            h = hash((h, tuple(keys[b * self.block_size : (b + 1) * self.block_size])))
            out.append(h)
        return out

    def match_prefix(self, seq: Sequence) -> int:
        """Attach cached blocks for the longest shared prompt prefix; returns tokens covered.

        At least one prompt token is always left to compute: its logits start the generation.
        """
        assert not seq.block_table
        if not self.enable_prefix_cache:
            return 0
        self.prefix_queries += seq.num_prompt
        for h in self._block_hashes(seq, seq.num_prompt - 1):
            block = self._by_hash.get(h)
            if block is None:
                break
            self._take(block)
            seq.block_table.append(block)
        cached = len(seq.block_table) * self.block_size
        self.prefix_hits += cached
        return cached

    def register(self, seq: Sequence) -> None:
        """Name the prompt blocks that are now full and computed, so later prompts can share them."""
        if not self.enable_prefix_cache:
            return
        upto = min(seq.num_computed, seq.num_prompt)
        for b, h in enumerate(self._block_hashes(seq, upto)):
            block = seq.block_table[b]
            if block in self._hash_of:
                continue
            if h in self._by_hash:          # same content computed twice concurrently: keep the first
                continue
            self._hash_of[block], self._by_hash[h] = h, block

    def forget_prefixes(self) -> None:
        """Drop every cached prefix and zero the hit counters (after a warm-up, whose synthetic
        prompts must neither serve a real request nor count in its hit rate). Only while no
        sequence holds a block."""
        if any(self._ref):
            raise RuntimeError("forget_prefixes while sequences hold blocks")
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._hash_of.clear()
        self._by_hash.clear()
        self.prefix_queries = self.prefix_hits = 0

    # -- allocation --------------------------------------------------------------------------
    def ensure(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow seq's block table to hold num_tokens tokens; False (and no change) if out of blocks."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need > self.num_free:
            return False
        for _ in range(need):
            seq.block_table.append(self._allocate())
        return True

    def free(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        seq.block_table = []

    def _take(self, block: int) -> None:
        if self._ref[block] == 0:
            self._evictable.pop(block, None)
        self._ref[block] += 1

    def _allocate(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._by_hash[self._hash_of.pop(block)]
        self._ref[block] = 1
        return block
