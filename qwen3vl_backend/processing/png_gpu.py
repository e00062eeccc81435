"""Plain PNGs decoded with their unfiltering on the GPU: the host inflates, the device unfilters.

A noisy 1280x720 PNG spent ~16 of pyspng's ~16.3 ms on the GPU host in zlib's inflate (NOTES),
which no GPU library here does. libdeflate (the `deflate` package) inflates the same stream in
~0.6 of zlib's time on this machine's CPU (4.9 against 7.1 ms, pyspng 8.1). Here the scanlines
are unfiltered by kernels.png on the device the ViT runs on, where they are going anyway. Served
on an H200 this gained nothing (the unfilter's ~8 ms landed in the vit: NOTES, twenty-seventh
session); the host's own path now gives libdeflate's output to libspng in stored blocks
(media._stored_png). Lossless: the same pixels as decode_image_array, byte for byte (tests).

`gpu_png_size(data)` says which PNGs take this path, from the header: 8-bit grayscale, RGB, gray +
alpha or RGBA (screenshots), not interlaced, where `deflate` imports and QWEN3VL_PNG_ON_VIT=1 is set
(off: measured, it gained nothing; the other PNGs, with palettes, 16 bits or Adam7, stay on the
host decoder). Alpha is composited onto white as the host does, by PIL's own integer arithmetic
(`on_white`, media.ON_WHITE: every colour and alpha pair checked against PIL). `decode_png` then
checks what the header cannot: every chunk's CRC, no tRNS (transparency is composited onto white
on the host's path), an IEND (the host path's own walk, media._plain_png_chunks, beside the
inflate), a zlib stream that inflates to exactly the scanlines with its checksum intact, and
filter types below 5; a PNG failing any of them gives None, and the caller decodes it on the
host, which refuses a damaged one with its own message.
"""

from __future__ import annotations

import functools
import os
import zlib

import numpy as np
import torch

# deflate: None where libdeflate does not import (the host decodes every PNG then)
from .media import _PNG_CHANNELS as _CHANNELS, _PNG_SIGNATURE as SIGNATURE, ON_WHITE, deflate

ENABLED = os.environ.get("QWEN3VL_PNG_ON_VIT", "0") == "1"


def gpu_png_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a PNG whose header this path takes; None for any other image."""
    if (not ENABLED or deflate is None or len(data) < 33 or data[:8] != SIGNATURE
            or data[8:16] != b"\x00\x00\x00\x0dIHDR"):
        return None
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    depth, colour, method, filtering, interlace = data[24:29]
    if (depth != 8 or colour not in _CHANNELS or method or filtering or interlace or not 0 < w < 2 ** 31
            or not 0 < h < 2 ** 31 or zlib.crc32(data[12:29]) != int.from_bytes(data[29:33], "big")):
        return None
    return h, w


def decode_png(data: bytes, height: int, width: int, device: torch.device) -> torch.Tensor | None:
    """A PNG that gpu_png_size admits -> its (height * width, 3) uint8 pixels on `device` (the
    unfiltering by kernels.png on a GPU, by its torch reference elsewhere), or None where the
    PNG does not hold up (the module's docstring: the host decodes it then)."""
    if gpu_png_size(data) != (height, width):
        return None
    from .media import BESIDE_DECODE, _plain_png_chunks, inflate_png

    channels = _CHANNELS[data[25]]
    # every chunk's CRC, no tRNS, an IEND: walked on another core while libdeflate (which lets go
    # of the GIL) inflates (~1 ms of the noise PNG's on the GPU host)
    intact = BESIDE_DECODE.submit(_plain_png_chunks, data)
    inflated = inflate_png(data, height * (1 + width * channels))
    if not intact.result() or inflated is None:
        return None
    rows = np.frombuffer(inflated[1], dtype=np.uint8).reshape(height, -1)
    if int(rows[:, 0].max()) > 4:
        return None
    from kernels.png import unfilter, unfilter_reference

    scanlines = torch.from_numpy(rows)
    if device.type == "cuda":
        with torch.cuda.device(device):
            pixels = unfilter(scanlines.pin_memory().to(device, non_blocking=True), channels)
    else:
        pixels = unfilter_reference(scanlines, channels).to(device)
    pixels = pixels.view(-1, channels)
    colour = pixels[:, :3] if channels >= 3 else pixels[:, :1].expand(-1, 3)
    if channels in (2, 4):
        return on_white(colour, pixels[:, -1:])
    return colour if channels == 3 else colour.contiguous()


def on_white(colour: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """uint8 colours (N, 3) and alphas (N, 1) over an opaque white background -> uint8 (N, 3), as
    PIL's Image.alpha_composite(white, image) gives them: media.ON_WHITE's (alpha, colour) table,
    looked up on the colours' device."""
    return _on_white_table(colour.device)[alpha.long(), colour.long()]


@functools.lru_cache(maxsize=None)
def _on_white_table(device: torch.device) -> torch.Tensor:
    return torch.from_numpy(ON_WHITE).to(device)
