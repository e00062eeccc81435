"""ViT embedding cache: vision outputs of recent media, keyed by each item's content hash (its
encoded bytes, grid and, for videos, the frame sampling: processing.processor._hash).

Least recently used entries go first once the cache passes its size in MB; 0 MB disables it.
A request's items are split into hits (outputs reused) and misses (one ViT call over all of
them); the results are reassembled in the request's order.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch


class VisionCache:
    def __init__(self, capacity_mb: float):
        self.capacity = int(capacity_mb * 2**20)
        self._entries: OrderedDict[str, tuple[torch.Tensor, list[torch.Tensor]]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def get(self, key: str):
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: str, embeds: torch.Tensor, deepstack: list[torch.Tensor]) -> None:
        size = _nbytes(embeds, deepstack)
        if not self.enabled or size > self.capacity:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = (embeds, deepstack)
            self._bytes += size
            while self._bytes > self.capacity:
                _, (e, d) = self._entries.popitem(last=False)
                self._bytes -= _nbytes(e, d)

    def discard(self, key: str) -> None:
        """Forget `key`'s outputs (the vit's, where they came from pixels it has since refused)."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._bytes -= _nbytes(*entry)


def _nbytes(embeds, deepstack) -> int:
    return embeds.numel() * embeds.element_size() + sum(d.numel() * d.element_size() for d in deepstack)


def encode_with_cache(encode, cache: VisionCache | None, pixel_values: torch.Tensor,
                      grids: list[tuple[int, int, int]], keys: list[str] | None, merge_unit: int):
    """ViT outputs for all items, computing only the items the cache lacks.

    encode(pixels, grids) -> (embeds (N/merge_unit, D), deepstack levels); returns the same for all items.
    """
    patches = [t * h * w for t, h, w in grids]
    if cache is None or not cache.enabled or not keys or len(keys) != len(grids):
        return encode(pixel_values, grids)
    found = [cache.get(k) for k in keys]
    missing = [i for i, f in enumerate(found) if f is None]
    if missing:
        starts = [0]
        for p in patches:
            starts.append(starts[-1] + p)
        pix = torch.cat([pixel_values[starts[i]:starts[i + 1]] for i in missing])
        embeds, deepstack = encode(pix, [grids[i] for i in missing])
        offset = 0
        for i in missing:
            n = patches[i] // merge_unit
            item = (embeds[offset:offset + n], [d[offset:offset + n] for d in deepstack])
            cache.put(keys[i], *item)
            found[i] = item
            offset += n
    return torch.cat([f[0] for f in found]), [torch.cat([f[1][lvl] for f in found]) for lvl in range(len(found[0][1]))]


def encode_checked(encode, cache: VisionCache | None, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]],
                   keys: list[str] | None, merge_unit: int, checks=(), remake=None):
    """encode_with_cache, then the checks pending on some items' pixels (jpeg_gpu.decode_frame's:
    (item, Future of a bool)), waited for while the device encodes. Where one says False, that
    item's outputs leave the cache and the items are encoded again from `remake()`'s pixels (the
    items whose outputs are still cached are not)."""
    out = encode_with_cache(encode, cache, pixel_values, grids, keys, merge_unit)
    damaged = [i for i, check in checks if not check.result()]
    if not damaged:
        return out
    if cache is not None and keys and len(keys) == len(grids):
        for i in damaged:
            cache.discard(keys[i])
    return encode_with_cache(encode, cache, remake(), grids, keys, merge_unit)
