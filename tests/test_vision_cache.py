"""The ViT embedding cache: hits skip the ViT, outputs are unchanged, size is bounded."""

import torch

from conftest import data_uri, image_bytes, make_image
from qwen3vl_backend.loader import load_model
from qwen3vl_backend.processing.processor import Processor
from qwen3vl_backend.engine.vision_cache import VisionCache, encode_with_cache


class CountingViT:
    def __init__(self, model):
        self.model, self.calls, self.patches = model, 0, 0

    def __call__(self, pixels, grids):
        self.calls += 1
        self.patches += pixels.shape[0]
        with torch.no_grad():
            return self.model.visual(pixels, grids)


def _media(proc, *images):
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(image_bytes(i))}}
                                         for i in images]}]
    return proc.process_messages(msgs).media


def _encode(vit, cache, media):
    return encode_with_cache(vit, cache, torch.cat([m.pixel_values for m in media]), [m.grid_thw for m in media],
                             [m.content_hash for m in media], 4)


def test_repeated_image_skips_the_vit_and_outputs_are_identical(tiny_dense):
    proc, vit = Processor(tiny_dense), CountingViT(load_model(tiny_dense))
    a, b = make_image(200, 150, 1), make_image(160, 120, 2)
    media = _media(proc, a, b)
    uncached = _encode(vit, None, media)
    cache = VisionCache(64)
    first = _encode(vit, cache, media)
    calls, patches = vit.calls, vit.patches
    again = _encode(vit, cache, _media(proc, b, a))           # same images, other order: no ViT at all
    assert vit.calls == calls and vit.patches == patches and cache.hits == 2
    new = _media(proc, make_image(100, 100, 3))[0]
    mixed = _encode(vit, cache, _media(proc, a, make_image(100, 100, 3)))   # one hit, one miss
    assert vit.calls == calls + 1 and vit.patches == patches + new.pixel_values.shape[0]
    torch.testing.assert_close(first[0], uncached[0], rtol=0, atol=0)
    for x, y in zip(first[1], uncached[1]):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    n_a = media[0].num_tokens
    torch.testing.assert_close(again[0][-n_a:], uncached[0][:n_a], rtol=0, atol=0)
    torch.testing.assert_close(mixed[0][:n_a], uncached[0][:n_a], rtol=0, atol=0)


def test_zero_megabytes_disables_the_cache(tiny_dense):
    proc, vit = Processor(tiny_dense), CountingViT(load_model(tiny_dense))
    media = _media(proc, make_image(200, 150, 1))
    cache = VisionCache(0)
    _encode(vit, cache, media)
    _encode(vit, cache, media)
    assert vit.calls == 2 and cache.size_bytes == 0


def test_least_recently_used_goes_first():
    cache = VisionCache(1)                       # 1 MiB: room for two 0.4 MiB entries
    entry = lambda: (torch.zeros(100, 1024), [])  # noqa: E731  (400 KiB of float32)
    cache.put("a", *entry())
    cache.put("b", *entry())
    assert cache.get("a") is not None            # a is now the most recent
    cache.put("c", *entry())
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert cache.size_bytes <= 2**20


def test_discard_forgets_an_entry_and_its_bytes():
    """VisionCache.discard (the vit's, for outputs made from a damaged JPEG's nvJPEG pixels): the
    entry goes, its bytes leave the count, so the room is there for the next; an absent key is a
    no-op."""
    cache = VisionCache(1)
    entry = lambda: (torch.zeros(100, 1024), [torch.zeros(100, 1024)])  # noqa: E731  (800 KiB)
    cache.put("a", *entry())
    assert cache.size_bytes == 800 * 1024
    cache.discard("a")
    cache.discard("never there")
    assert cache.get("a") is None and cache.size_bytes == 0
    cache.put("b", *entry())
    assert cache.get("b") is not None and cache.size_bytes == 800 * 1024
