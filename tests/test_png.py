"""PNGs with alpha (screenshots) decoded on the host: their pixels composited onto white as PIL's
alpha_composite does."""

import numpy as np


def test_on_white_is_pils_alpha_composite_for_every_colour_and_alpha():
    """media.ON_WHITE, as the host's _on_white looks it up, against
    Image.alpha_composite(white, image).convert("RGB"), decode_image's path for images with
    alpha, at all 256 x 256 (colour, alpha) pairs."""
    from PIL import Image

    from qwen3vl_backend.processing import media

    a = np.repeat(np.arange(256), 256).astype(np.uint8)
    c = np.tile(np.arange(256), 256).astype(np.uint8)
    rgba = np.stack([c, 255 - c, c // 2, a], -1)
    src = Image.fromarray(rgba.reshape(256, 256, 4), "RGBA")
    want = np.asarray(Image.alpha_composite(Image.new("RGBA", src.size, (255, 255, 255, 255)), src).convert("RGB"))
    host = media._on_white(rgba.reshape(256, 256, 4))       # every byte looked up (most are translucent)
    assert host.dtype == np.uint8 and host.flags.c_contiguous and np.array_equal(host, want)
    # the same pairs as every 16th pixel of an opaque image: only those looked up
    sparse = np.tile(np.array([9, 200, 31, 255], np.uint8), (1024 * 1024, 1))
    sparse[::16] = rgba
    src = Image.fromarray(sparse.reshape(1024, 1024, 4), "RGBA")
    want = np.asarray(Image.alpha_composite(Image.new("RGBA", src.size, (255, 255, 255, 255)), src).convert("RGB"))
    assert np.array_equal(media._on_white(sparse.reshape(1024, 1024, 4)), want)
