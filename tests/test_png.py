"""kernels.png: PNG scanlines unfiltered by the wavefront kernel (the interpreter on a CPU) against
the image they were filtered from and the torch reference."""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conftest import image_bytes  # noqa: E402
from kernels.png import unfilter, unfilter_reference  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def filter_rows(img: np.ndarray, kinds: np.ndarray, bpp: int) -> np.ndarray:
    """The encoder's side, from the unfiltered bytes (so vectorised): (H, row) uint8 and a filter type
    a row -> (H, 1 + row) scanlines."""
    x = img.astype(np.int32)
    h, row = x.shape
    a = np.zeros_like(x)
    a[:, bpp:] = x[:, :-bpp]
    b = np.zeros_like(x)
    b[1:] = x[:-1]
    c = np.zeros_like(x)
    c[1:, bpp:] = x[:-1, :-bpp]
    pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
    paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    pred = np.stack([np.zeros_like(x), a, b, (a + b) >> 1, paeth])[kinds, np.arange(h)]
    return np.concatenate([kinds[:, None], (x - pred) & 255], axis=1).astype(np.uint8)


@pytest.mark.parametrize("h,w,bpp,levels", [(1, 1, 3, 256), (5, 7, 3, 256), (33, 9, 1, 256), (9, 33, 4, 256),
                                            (40, 13, 6, 256), (3, 5, 8, 256), (70, 6, 2, 256), (24, 24, 3, 4)])
def test_unfilter_gives_back_the_filtered_image(h, w, bpp, levels):
    """Every filter type, rows in random order, at widths and heights past one lane and one band
    (the kernel's band is 64 rows here, so 70 rows cross into a second band); four levels a byte
    make Paeth's ties common (its order of preference: a, then b, then c)."""
    import kernels.png as png

    rng = np.random.default_rng(h * 1000 + w * 10 + bpp)
    img = rng.integers(0, levels, (h, w * bpp), dtype=np.uint8)
    kinds = rng.integers(0, 5, h)
    kinds[: min(h, 5)] = np.arange(min(h, 5))       # each type at least once, the first row too
    data = torch.from_numpy(filter_rows(img, kinds, bpp))
    ref = unfilter_reference(data, bpp)
    assert torch.equal(ref, torch.from_numpy(img))
    old = png.MAX_ROWS
    png.MAX_ROWS = 64
    try:
        out = unfilter(data.to(DEV), bpp).cpu()
    finally:
        png.MAX_ROWS = old
    assert torch.equal(out, torch.from_numpy(img)), (out.int() - torch.from_numpy(img).int()).abs().max()


def test_unfilter_refuses_what_is_not_scanlines():
    with pytest.raises(ValueError, match="whole pixels"):
        unfilter(torch.zeros(2, 1 + 7, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="uint8"):
        unfilter(torch.zeros(2, 4, dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="filter type 5"):
        unfilter_reference(torch.tensor([[5, 1, 2, 3]], dtype=torch.uint8), 3)


# -- processing/png_gpu.py: which PNGs the vit decodes, and what it gives ------------------------

def _chunk(kind: bytes, body: bytes) -> bytes:
    import zlib

    return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    pos, out = 8, []
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        out.append((data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]))
        pos += 12 + n
    return out


def _rebuild(data: bytes, stream: bytes | None = None, pieces: int = 1, extra: list | None = None) -> bytes:
    """The PNG with its image data replaced by `stream` (a zlib stream) in `pieces` IDAT chunks,
    `extra` chunks before them."""
    chunks = _chunks(data)
    assert chunks[0][0] == b"IHDR"
    idat = stream if stream is not None else b"".join(b for k, b in chunks if k == b"IDAT")
    step = -(-len(idat) // pieces)
    out = data[:8] + _chunk(b"IHDR", chunks[0][1]) + b"".join(_chunk(k, b) for k, b in extra or [])
    out += b"".join(_chunk(b"IDAT", idat[i:i + step]) for i in range(0, len(idat), step))
    return out + _chunk(b"IEND", b"")


png_gpu = pytest.importorskip("qwen3vl_backend.processing.png_gpu")
needs_deflate = pytest.mark.skipif(png_gpu.deflate is None, reason="the deflate package is not installed")


@pytest.fixture(autouse=True)
def _png_on_vit(monkeypatch):
    """The path is off by default (QWEN3VL_PNG_ON_VIT) until measured on a GPU; these tests turn it on."""
    monkeypatch.setattr(png_gpu, "ENABLED", True)


@needs_deflate
def test_decode_png_gives_the_hosts_pixels():
    """8-bit RGB, grayscale, RGBA and gray + alpha PNGs as PIL writes them (its adaptive filters:
    every type in a noisy image), in one IDAT or split over several, through decode_png (the torch
    unfilter on a CPU) -> decode_image_array's pixels (alpha composited onto white), byte for byte."""
    from PIL import Image

    from conftest import make_image
    from qwen3vl_backend.processing.media import decode_image_array, gpu_image_size

    rng = np.random.default_rng(3)
    rgba = np.concatenate([np.asarray(make_image(29, 17, 7)), rng.integers(0, 256, (17, 29, 1), dtype=np.uint8)], -1)
    rgba[0, :4, 3] = (0, 255, 1, 254)       # transparent, opaque and next to both
    cases = [make_image(37, 23, 1), make_image(40, 72, 2).convert("L"),
             Image.fromarray(rng.integers(0, 256, (19, 31, 3), dtype=np.uint8)), Image.fromarray(rgba, "RGBA"),
             Image.fromarray(rgba, "RGBA").convert("LA")]
    for img in cases:
        for data in (image_bytes(img), _rebuild(image_bytes(img), pieces=3), image_bytes(img, compress_level=0)):
            h, w = img.height, img.width
            assert gpu_image_size(data) == (h, w)
            got = png_gpu.decode_png(data, h, w, torch.device("cpu"))
            assert got is not None and got.shape == (h * w, 3) and got.dtype == torch.uint8
            assert torch.equal(got, torch.from_numpy(decode_image_array(data)).view(-1, 3))


def test_gpu_png_size_takes_plain_png_headers_only(monkeypatch):
    """8-bit RGB, gray, RGBA or gray + alpha, not interlaced, a whole IHDR; palettes, 16 bits, Adam7, a damaged
    IHDR and other formats are the host's; so is every PNG where deflate does not import or the
    switch is off. The pixel limit holds as on the host."""
    from PIL import Image

    from conftest import make_image
    from qwen3vl_backend.processing.media import MediaError, gpu_image_size

    img = make_image(20, 10, 4)
    rgb = image_bytes(img)
    if png_gpu.deflate is not None:
        for mode in ("RGB", "L", "RGBA", "LA"):
            assert png_gpu.gpu_png_size(image_bytes(img.convert(mode))) == (10, 20), mode
        with pytest.raises(MediaError, match="pixel limit"):
            gpu_image_size(rgb, max_pixels=199)
    adam7 = _rebuild(rgb[:28] + b"\x01" + rgb[29:])       # interlaced, its IHDR's CRC made again
    damaged = rgb[:23] + b"\x0b" + rgb[24:]                # the height changed, not the CRC
    assert png_gpu.gpu_png_size(_rebuild(rgb)) == png_gpu.gpu_png_size(rgb)
    for other in (image_bytes(img.convert("P")), image_bytes(Image.fromarray(np.zeros((4, 4), np.uint16))), adam7,
                  damaged, b"GIF89a" + rgb[6:]):
        assert png_gpu.gpu_png_size(other) is None
    monkeypatch.setattr(png_gpu, "deflate", None)
    assert png_gpu.gpu_png_size(rgb) is None and gpu_image_size(rgb) is None
    monkeypatch.undo()
    monkeypatch.setattr(png_gpu, "ENABLED", False)
    assert png_gpu.gpu_png_size(rgb) is None and gpu_image_size(rgb) is None


@needs_deflate
def test_decode_png_leaves_damaged_pngs_to_the_host():
    """What the header cannot say: a chunk's bad CRC, a tRNS chunk, no IEND, a stream that is short,
    long or fails its checksum, a filter type past 4, and a size other than the caller's: None
    (decode_frame then decodes on the host, which refuses the damaged ones itself or, as PIL does
    an IDAT's bad CRC, decodes past it)."""
    import zlib

    from conftest import make_image
    from qwen3vl_backend.processing.media import MediaError, decode_image

    img = make_image(16, 9, 5)
    good = image_bytes(img)
    cpu = torch.device("cpu")
    assert png_gpu.decode_png(good, 9, 16, cpu) is not None
    raw = bytearray(zlib.decompress(b"".join(b for k, b in _chunks(good) if k == b"IDAT")))
    bad_crc = bytearray(good)
    bad_crc[-13] ^= 1                   # the last IDAT's CRC, its data intact
    bad_filter = bytearray(raw)
    bad_filter[(1 + 16 * 3) * 4] = 5    # row 4's filter type
    stream = zlib.compress(bytes(raw))
    cases = {"crc": bytes(bad_crc), "trns": _rebuild(good, extra=[(b"tRNS", b"\x00\x01\x00\x02\x00\x03")]),
             "no iend": good[:-12], "short": _rebuild(good, zlib.compress(bytes(raw[:-3]))),
             "long": _rebuild(good, zlib.compress(bytes(raw) + b"\x00" * 49)),
             "checksum": _rebuild(good, stream[:-1] + bytes([stream[-1] ^ 1])),
             "filter": _rebuild(good, zlib.compress(bytes(bad_filter)))}
    for why, data in cases.items():
        assert png_gpu.decode_png(data, 9, 16, cpu) is None, why
    assert png_gpu.decode_png(good, 16, 9, cpu) is None
    for why in ("filter", "checksum", "short"):     # PIL decodes past an IDAT's bad CRC: the same pixels
        with pytest.raises(MediaError):
            decode_image(cases[why])


@needs_deflate
def test_the_kernel_unfilters_pils_scanlines():
    """kernels.png.unfilter on the scanlines of PNGs that PIL wrote (its own choice of filters, a
    noisy image's mix of all five), inflated as decode_png does -> PIL's pixels; 70 rows over
    two bands of 64."""
    import zlib

    import kernels.png as png
    from PIL import Image

    from qwen3vl_backend.processing import media

    rng = np.random.default_rng(8)
    for arr in (rng.integers(0, 255, (70, 45, 3), dtype=np.uint8), rng.integers(0, 255, (9, 50), dtype=np.uint8)):
        data = image_bytes(Image.fromarray(arr))
        raw = zlib.decompress(media.png_image_data(data))
        bpp = 3 if arr.ndim == 3 else 1
        scanlines = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(arr.shape[0], -1)
        assert len(set(scanlines[:, 0].tolist())) > 1
        old, png.MAX_ROWS = png.MAX_ROWS, 64
        try:
            out = unfilter(scanlines.to(DEV), bpp).cpu()
        finally:
            png.MAX_ROWS = old
        assert torch.equal(out.view(arr.shape), torch.from_numpy(arr))


@needs_deflate
def test_decode_frame_takes_pngs_to_the_gpu_path_and_damage_to_the_host(monkeypatch):
    """decode_frame on a GPU device (pretended: the stream calls stubbed, decode_png run on the CPU):
    a plain PNG's pixels come from png_gpu.decode_png; a PNG that decode_png leaves (a filter type
    of 5) goes to the host's decoder, which refuses it (the vit's 400); with `gpu` False the host
    decodes every one."""
    import contextlib
    import zlib

    from conftest import make_image
    from qwen3vl_backend.processing import jpeg_gpu, media
    from qwen3vl_backend.processing.media import decode_image_array

    calls = []
    real = png_gpu.decode_png

    def on_cpu(data, height, width, device):
        calls.append(device.type)
        return real(data, height, width, torch.device("cpu"))

    class Stream:
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(png_gpu, "decode_png", on_cpu)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: Stream())
    monkeypatch.setattr(jpeg_gpu, "_decode_stream", lambda device: Stream())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: self)
    cuda = torch.device("cuda")
    good = image_bytes(make_image(24, 20, 6))
    want = torch.from_numpy(decode_image_array(good)).view(-1, 3)
    assert torch.equal(jpeg_gpu.decode_frame(good, 20, 24, cuda), want) and calls == ["cuda"]
    assert torch.equal(jpeg_gpu.decode_frame(good, 20, 24, cuda, gpu=False), want) and calls == ["cuda"]
    raw = bytearray(zlib.decompress(media.png_image_data(good)))
    raw[0] = 5
    bad = _rebuild(good, zlib.compress(bytes(raw)))
    with pytest.raises(ValueError, match="not a decodable image"):
        jpeg_gpu.decode_frame(bad, 20, 24, cuda)
    assert calls == ["cuda", "cuda"]


def test_on_white_is_pils_alpha_composite_for_every_colour_and_alpha():
    """media.ON_WHITE, as png_gpu.on_white looks it up and as the host's _on_white does, against
    Image.alpha_composite(white, image).convert("RGB"), decode_image's path for images with
    alpha, at all 256 x 256 (colour, alpha) pairs."""
    from PIL import Image

    from qwen3vl_backend.processing import media

    a = np.repeat(np.arange(256), 256).astype(np.uint8)
    c = np.tile(np.arange(256), 256).astype(np.uint8)
    rgba = np.stack([c, 255 - c, c // 2, a], -1)
    src = Image.fromarray(rgba.reshape(256, 256, 4), "RGBA")
    want = np.asarray(Image.alpha_composite(Image.new("RGBA", src.size, (255, 255, 255, 255)), src).convert("RGB"))
    got = png_gpu.on_white(torch.from_numpy(rgba[:, :3]), torch.from_numpy(rgba[:, 3:]))
    assert got.dtype == torch.uint8 and torch.equal(got, torch.from_numpy(want.reshape(-1, 3)))
    host = media._on_white(rgba.reshape(256, 256, 4))       # every byte looked up (most are translucent)
    assert host.dtype == np.uint8 and host.flags.c_contiguous and np.array_equal(host, want)
    # the same pairs as every 16th pixel of an opaque image: only those looked up
    sparse = np.tile(np.array([9, 200, 31, 255], np.uint8), (1024 * 1024, 1))
    sparse[::16] = rgba
    src = Image.fromarray(sparse.reshape(1024, 1024, 4), "RGBA")
    want = np.asarray(Image.alpha_composite(Image.new("RGBA", src.size, (255, 255, 255, 255)), src).convert("RGB"))
    assert np.array_equal(media._on_white(sparse.reshape(1024, 1024, 4)), want)
