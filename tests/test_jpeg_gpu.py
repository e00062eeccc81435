"""JPEGs decoded by the vit (processing/jpeg_gpu.py): libjpeg-turbo's upsampling and colour
conversion as tensor ops, which JPEGs preprocess sends undecoded, and the vit's side of them. On
the CPU the vit decodes them with the host's decoder; nvJPEG itself is tested on a GPU
(test_gpu.py: test_nvjpeg_decodes_to_libjpeg_turbos_pixels)."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

simplejpeg = pytest.importorskip("simplejpeg")

from conftest import data_uri, image_bytes, make_image  # noqa: E402
from qwen3vl_backend.processing import jpeg_gpu  # noqa: E402
from qwen3vl_backend.processing.media import MediaError, MediaPolicy, gpu_jpeg_size  # noqa: E402
from qwen3vl_backend.processing.processor import Processor  # noqa: E402

FACTORS = {"444": (1, 1), "422": (2, 1), "420": (2, 2)}


def _blocks(rng, h: int, w: int) -> np.ndarray:
    """(h, w) uint8, one random value per 8x8 block: a JPEG at quality 100 decodes such a plane
    exactly (each block's DC alone), so a component's decoded samples are known."""
    v = rng.integers(0, 256, (-(-h // 8), -(-w // 8)), dtype=np.uint8)
    return np.ascontiguousarray(np.repeat(np.repeat(v, 8, 0), 8, 1)[:h, :w])


def _planes_jpeg(rng, h: int, w: int, sub: str):
    """A JPEG made from known planes -> (its bytes, the decoded planes [Y, Cb, Cr])."""
    fh, fv = FACTORS[sub]
    cb, cr = (_blocks(rng, -(-h // fv), -(-w // fh)) for _ in range(2))
    data = simplejpeg.encode_jpeg_yuv_planes(_blocks(rng, h, w), cb, cr, quality=100)
    # the luma plane as decoded (the encoder pads it to the subsampled MCU from memory past an odd
    # side, so its edge blocks are not the ones given); libjpeg's YCbCr -> gray is Y itself
    y = np.ascontiguousarray(simplejpeg.decode_jpeg(data, colorspace="GRAY")[..., 0])
    assert simplejpeg.decode_jpeg_header(data)[3] == sub
    return data, [torch.from_numpy(p) for p in (y, cb, cr)]


@pytest.mark.parametrize("sub", ["444", "422", "420"])
def test_planes_to_rgb_is_libjpeg_turbos_upsampling_and_colour(sub):
    """Decoded planes -> RGB as libjpeg-turbo makes them (simplejpeg; PIL's are the same), bit for
    bit: its fancy upsampling's rounding (+1/+2 across one axis, +8/+7 across two) at every block
    edge of random planes, the image's edges (repeated samples), odd sides (a half chroma sample
    past them, cropped) and the colour tables."""
    rng = np.random.default_rng(5)
    for h, w in ((720, 1280), (33, 47), (17, 16), (101, 259), (1079, 1919)):
        data, planes = _planes_jpeg(rng, h, w, sub)
        got = jpeg_gpu.planes_to_rgb(planes, sub, h, w)
        assert got.shape == (h, w, 3) and got.dtype == torch.uint8
        assert torch.equal(got, torch.from_numpy(simplejpeg.decode_jpeg(data, colorspace="RGB"))), (h, w, sub)


def test_colour_tables_every_chroma_pair():
    """Every (Cb, Cr) pair, each in its own 8x8 block of a 4:4:4 JPEG with a random Y."""
    rng = np.random.default_rng(6)
    cb, cr = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8), indexing="ij")
    big = lambda p: np.ascontiguousarray(np.repeat(np.repeat(p, 8, 0), 8, 1))   # noqa: E731
    y = big(rng.integers(0, 256, (256, 256), dtype=np.uint8))
    data = simplejpeg.encode_jpeg_yuv_planes(y, big(cb), big(cr), quality=100)
    got = jpeg_gpu.planes_to_rgb([torch.from_numpy(p) for p in (y, big(cb), big(cr))], "444", 2048, 2048)
    assert torch.equal(got, torch.from_numpy(simplejpeg.decode_jpeg(data, colorspace="RGB")))


def test_grayscale_planes_repeat_luma():
    y = torch.randint(0, 256, (19, 23), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    data = simplejpeg.encode_jpeg_yuv_planes(y.numpy(), None, None, quality=100)
    y = torch.from_numpy(np.ascontiguousarray(simplejpeg.decode_jpeg(data, colorspace="GRAY")[..., 0]))
    assert torch.equal(jpeg_gpu.planes_to_rgb([y], "Gray", 19, 23),
                       torch.from_numpy(simplejpeg.decode_jpeg(data, colorspace="RGB")))


def _jpeg(w: int, h: int, seed: int = 0, **save) -> bytes:
    buf = io.BytesIO()
    make_image(w, h, seed).save(buf, format="JPEG", **save)
    return buf.getvalue()


def test_which_jpegs_go_to_the_vit_undecoded():
    """gpu_jpeg_size: baseline 8-bit JPEGs in YCbCr 4:4:4 / 4:2:2 / 4:2:0 or gray, whole (ending in
    their end-of-image marker) and not tiny; nothing else (the host decodes those)."""
    for sub in ("4:4:4", "4:2:2", "4:2:0"):
        assert gpu_jpeg_size(_jpeg(64, 48, subsampling=sub)) == (48, 64)
        # restart intervals, as cameras write them (nvJPEG's pixels were libjpeg-turbo's on an H200)
        assert gpu_jpeg_size(_jpeg(64, 48, subsampling=sub, restart_marker_blocks=2)) == (48, 64)
        assert gpu_jpeg_size(_jpeg(64, 48, subsampling=sub, restart_marker_rows=1)) == (48, 64)
    gray = io.BytesIO()
    make_image(40, 30, 1).convert("L").save(gray, format="JPEG")
    assert gpu_jpeg_size(gray.getvalue()) == (30, 40)
    cmyk = io.BytesIO()
    make_image(40, 30, 1).convert("CMYK").save(cmyk, format="JPEG")
    whole = _jpeg(64, 48)
    for data in (_jpeg(64, 48, progressive=True),           # nvJPEG's progressive pixels are not libjpeg's
                 whole[:-40], whole[:-2],                    # truncated: the host refuses or recovers it
                 cmyk.getvalue(), _jpeg(12, 40), image_bytes(make_image(64, 48, 1)), b"\xff\xd8\xff" + b"\0" * 40,
                 whole[:2] + b"\xff\xe0\x00\x01" + whole[4:]):   # a segment length below its own 2 bytes
        assert gpu_jpeg_size(data) is None
    with pytest.raises(MediaError, match="pixel limit"):
        gpu_jpeg_size(whole, max_pixels=64 * 47)


def _preprocessors(tiny_dense):
    from qwen3vl_backend.serving.media_pool import MediaPool
    from qwen3vl_backend.serving.preprocess import Preprocessor

    proc = Processor(tiny_dense)
    pool = MediaPool(2, 10)
    return (proc.cfg, Preprocessor(proc, MediaPolicy(), pool),
            Preprocessor(proc, MediaPolicy(), pool, raw_frames=True, encoded_frames=True))


def test_jpegs_sent_undecoded_make_the_hosts_rows(tiny_dense):
    """encoded_frames: an images-only request's baseline JPEGs leave preprocess as bytes
    (jpeg_bytes, jpeg_lengths), its other images (a PNG, a progressive JPEG) as pixels; the vit's
    raw_frames_to_rows decodes them (here on the host) into the rows the host path sends, bit for
    bit. A request whose images are not all sent unresized decodes them in preprocess."""
    from qwen3vl_backend.processing.vision_inputs import raw_frames_to_rows

    cfg, host, enc = _preprocessors(tiny_dense)
    images = [_jpeg(64, 48, 1), image_bytes(make_image(40, 72, 2)), _jpeg(333, 257, 3, subsampling="4:4:4"),
              _jpeg(50, 60, 4, progressive=True)]
    parts = [{"type": "image_url", "image_url": {"url": data_uri(b, "image/jpeg")}} for b in images]
    body = json.dumps({"messages": [{"role": "user", "content": parts}]})
    want, got = host.run(body), enc.run(body)
    for k in ("input_ids", "positions", "grid_thw", "media_hashes"):
        assert np.array_equal(got[k], want[k]), k
    assert got["jpeg_lengths"].tolist() == [len(images[0]), 0, len(images[2]), 0]
    assert bytes(got["jpeg_bytes"]) == images[0] + images[2]
    # the PNG's and the progressive JPEG's
    assert got["pixel_values"].shape == (40 * 72 + 50 * 60, 3)
    rows = raw_frames_to_rows(torch.from_numpy(got["pixel_values"]), got["source_sizes"], got["grid_thw"], cfg,
                              encoded=(got["jpeg_bytes"], got["jpeg_lengths"]))
    assert torch.equal(rows, torch.from_numpy(want["pixel_values"]))
    # one image far past its resize: every image resized here, the JPEGs decoded here first
    big = {"type": "image_url", "image_url": {"url": data_uri(_jpeg(400, 300, 9), "image/jpeg"), "max_pixels": 64 * 64}}
    body = json.dumps({"messages": [{"role": "user", "content": [parts[0], big]}]})
    mixed, host_mixed = enc.run(body), host.run(body)
    assert mixed["source_sizes"].shape == (0, 2) and mixed["jpeg_lengths"].shape == (0,)
    assert np.array_equal(mixed["pixel_values"], host_mixed["pixel_values"])
    # nothing encoded (a progressive JPEG): the two tensors are empty
    plain = enc.run(json.dumps({"messages": [{"role": "user", "content": parts[3:4]}]}))
    assert plain["jpeg_bytes"].shape == (0,) and plain["jpeg_lengths"].shape == (0,)


def test_the_vit_checks_jpegs_sent_undecoded(tiny_dense):
    """What raw_frames_to_rows refuses (the vit answers 400): byte counts that do not add up to the
    bytes or name another number of images, a JPEG of another size than its source size (found
    from its header, before it is decoded), and bytes that are no image."""
    from qwen3vl_backend.processing.vision_inputs import raw_frames_to_rows

    cfg = Processor(tiny_dense).cfg
    a, b = _jpeg(64, 48, 1), _jpeg(40, 32, 2)
    data = np.frombuffer(a + b, np.uint8)
    sizes, grids = [(48, 64), (32, 40)], [(1, 4, 4), (1, 2, 2)]
    none = torch.zeros(0, 3, dtype=torch.uint8)
    assert raw_frames_to_rows(none, sizes, grids, cfg, encoded=(data, [len(a), len(b)])).shape[0] == 16 + 4
    for pixels, encoded, sizes_, message in (
            (none, (data, [len(a), len(b) - 1]), sizes, "do not describe"),
            (none, (data, [len(a) + len(b)]), sizes, "do not describe"),
            (none, (data, [len(a) + len(b) + 1, -1]), sizes, "do not describe"),
            (none, (data, [len(a), len(b)]), [(48, 64), (40, 32)], "40x32|32x40"),
            (none, (np.frombuffer(a + b"\0" * len(b), np.uint8), [len(a), len(b)]), sizes, "not a decodable image"),
            (torch.zeros(5, 3, dtype=torch.uint8), (data, [len(a), len(b)]), sizes, "pixel_values has 5 pixels")):
        with pytest.raises(ValueError, match=message):
            raw_frames_to_rows(pixels, sizes_, grids, cfg, encoded=encoded)


def test_nvjpeg_refusals_fall_back_to_the_host(monkeypatch):
    """decode_frame on a GPU device: nvJPEG's answer when it decodes, the host's pixels when it
    refuses (here pretended: no GPU on this machine), and a 400 for a JPEG of the wrong size
    from nvJPEG's header read, before any plane is allocated."""
    data = _jpeg(64, 48, 3)
    want = torch.from_numpy(simplejpeg.decode_jpeg(data, colorspace="RGB")).view(-1, 3)
    calls = []

    class Refusing:
        def decode_rgb(self, data, device, height, width):
            calls.append((height, width))
            raise jpeg_gpu.NvJpegError("pretended refusal")

    monkeypatch.setattr(jpeg_gpu, "nvjpeg", lambda backend=0: Refusing())
    nothing = contextlib.nullcontext
    monkeypatch.setattr(torch.cuda, "device", lambda device: nothing())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: nothing())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: None)
    monkeypatch.setattr(jpeg_gpu, "_decode_stream", lambda device: None)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: self)      # the host's pixels stay here
    got = jpeg_gpu.decode_frame(data, 48, 64, torch.device("cuda"))
    assert calls == [(48, 64)] and torch.equal(got, want)


def _noise_jpeg(w: int, h: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
        buf, format="JPEG", quality=90)
    return buf.getvalue()


def _damaged(data: bytes) -> bytes:
    """The JPEG's entropy-coded data with a run zeroed: its header still passes gpu_jpeg_size,
    and libjpeg-turbo decodes it with a warning (corrupt data) and recovers."""
    out = bytearray(data)
    at = data.find(b"\xff\xda") + 40
    out[at:at + 20] = b"\0" * 20
    return bytes(out)


def _pretend_gpu(monkeypatch, seen: list):
    """decode_frame's GPU path on this CPU: nvJPEG pretended by a decoder that gives the host's
    pixels plus one (so whose pixels came back shows), the CUDA calls around it no-ops."""
    from qwen3vl_backend.processing.media import decode_image_array

    class Pretended:
        def decode_rgb(self, data, device, height, width):
            seen.append(len(data))
            return torch.from_numpy(decode_image_array(data)) + 1

    class Stream:
        def wait_stream(self, other):
            pass

    nothing = contextlib.nullcontext
    monkeypatch.setattr(jpeg_gpu, "nvjpeg", lambda backend=0: Pretended())
    monkeypatch.setattr(torch.cuda, "device", lambda device: nothing())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: nothing())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: Stream())
    monkeypatch.setattr(jpeg_gpu, "_decode_stream", lambda device: None)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: self)


def test_damaged_jpegs_get_the_hosts_pixels_not_nvjpegs(monkeypatch):
    """On an H200 nvJPEG recovered 1,164 of 1,931 damaged JPEGs (that gpu_jpeg_size admits) to
    other pixels than libjpeg-turbo: only a JPEG that libjpeg-turbo decodes without a warning
    (jpeg_gpu.intact) keeps nvJPEG's pixels; a damaged one gets the host's, at once or, with
    `checks`, once its pending check says False."""
    from qwen3vl_backend.processing.media import decode_image_array

    good = _noise_jpeg(64, 48, 5)
    bad = _damaged(good)
    assert gpu_jpeg_size(bad) == (48, 64) and jpeg_gpu.intact(good) and not jpeg_gpu.intact(bad)
    calls = []
    real = simplejpeg.decode_jpeg
    monkeypatch.setattr(simplejpeg, "decode_jpeg", lambda *a, **k: calls.append(real(*a, **k).shape))
    assert jpeg_gpu.intact(good) and calls == [(6, 8, 3)]        # at 1/8 scale, not the full 48 x 64
    monkeypatch.setattr(simplejpeg, "decode_jpeg", real)
    with pytest.raises(ValueError):
        simplejpeg.decode_jpeg(bad, strict=True)            # the host path's first try warns ...
    host = {k: torch.from_numpy(decode_image_array(d)).view(-1, 3) for k, d in (("good", good), ("bad", bad))}
    assert not torch.equal(host["good"], host["bad"])       # ... and PIL recovers it
    seen = []
    _pretend_gpu(monkeypatch, seen)
    cuda = torch.device("cuda")
    assert torch.equal(jpeg_gpu.decode_frame(good, 48, 64, cuda), host["good"] + 1)      # nvJPEG's
    assert torch.equal(jpeg_gpu.decode_frame(bad, 48, 64, cuda), host["bad"])            # the host's
    checks = []
    assert torch.equal(jpeg_gpu.decode_frame(bad, 48, 64, cuda, checks), host["bad"] + 1)
    assert len(checks) == 1 and checks[0].result() is False and len(seen) == 3


def test_the_vits_outputs_come_from_the_hosts_pixels_for_damaged_jpegs(monkeypatch):
    """vision_cache.encode_checked, as the vit runs it: a request's JPEGs decoded by (pretended)
    nvJPEG are encoded at once; where a JPEG's check then says it is damaged, its cached outputs
    go and it is encoded from the host's pixels. The intact JPEG keeps nvJPEG's; the request's
    outputs and the cache then hold what they should, with the cache and without it."""
    from qwen3vl_backend.engine.vision_cache import VisionCache, encode_checked
    from qwen3vl_backend.processing.vision_inputs import VisionProcessingConfig, image_grid, raw_frames_to_rows

    cfg = VisionProcessingConfig()
    good, bad = _noise_jpeg(64, 48, 6), _damaged(_noise_jpeg(96, 64, 7))
    sizes = [(48, 64), (64, 96)]
    grids = [image_grid(w, h, cfg) for h, w in sizes]
    unresized = torch.zeros(0, 3, dtype=torch.uint8)
    encoded = (np.frombuffer(good + bad, np.uint8), [len(good), len(bad)])
    unit = cfg.merge_size ** 2

    def encode(pixels, grids_):      # a stand-in ViT: each merged patch's sum
        embeds = pixels.double().reshape(-1, unit * pixels.shape[1]).sum(1, keepdim=True)
        return embeds, [embeds * 2]

    host_rows = raw_frames_to_rows(unresized, sizes, grids, cfg, encoded=encoded)      # on this CPU: the host's
    want = encode(host_rows, grids)[0]
    n_good = grids[0][1] * grids[0][2] // unit
    seen = []
    _pretend_gpu(monkeypatch, seen)
    cuda = torch.device("cuda")
    cache, keys = VisionCache(64), ["good", "bad"]
    checks = []
    rows = raw_frames_to_rows(unresized, sizes, grids, cfg, cuda, encoded, checks)
    assert [i for i, _ in checks] == [0, 1]
    nvjpeg_out = encode(rows, grids)[0]
    assert not torch.equal(nvjpeg_out[:n_good], want[:n_good]) and not torch.equal(nvjpeg_out[n_good:], want[n_good:])
    decoded = len(seen)
    embeds, deepstack = encode_checked(encode, cache, rows, grids, keys, unit, checks,
                                       lambda: raw_frames_to_rows(unresized, sizes, grids, cfg, cuda, encoded,
                                                                  gpu_decode=False))
    assert len(seen) == decoded         # the remake: the host's decodes only, no nvJPEG (nor checks) again
    assert torch.equal(embeds[:n_good], nvjpeg_out[:n_good])        # intact: nvJPEG's pixels
    assert torch.equal(embeds[n_good:], want[n_good:])              # damaged: the host's
    assert torch.equal(deepstack[0], embeds * 2)
    assert torch.equal(cache.get("bad")[0], want[n_good:]) and torch.equal(cache.get("good")[0], nvjpeg_out[:n_good])
    # without the cache every item is encoded again from the host's pixels (an intact JPEG's are
    # nvJPEG's on a GPU; the pretended decoder's differ, so the intact item shows it too)
    checks = []
    rows = raw_frames_to_rows(unresized, sizes, grids, cfg, cuda, encoded, checks)
    again, _ = encode_checked(encode, None, rows, grids, keys, unit, checks,
                              lambda: raw_frames_to_rows(unresized, sizes, grids, cfg, cuda, encoded, gpu_decode=False))
    assert torch.equal(again, want)
