"""JPEGs decoded on the GPU by nvJPEG, to libjpeg-turbo's RGB (PIL's, simplejpeg's) bit for bit.

nvJPEG's own RGB upsamples subsampled chroma its own way: on an H200, 96% of a noisy 4:2:0
1280x720 JPEG's pixels differed from libjpeg-turbo's, by up to 103. Its 4:4:4 RGB equalled
libjpeg-turbo's everywhere: the same integer IDCT and colour tables. So nvJPEG decodes each
component at its own resolution (NVJPEG_OUTPUT_YUV), and the rest is libjpeg-turbo's own
arithmetic written as integer tensor ops: its "fancy" (triangle) chroma upsampling, the decoder's
default that PIL and simplejpeg keep (jdsample.c: h2v1_fancy_upsample, h2v2_fancy_upsample, the
image's edge rows and columns repeated), and its YCbCr -> RGB tables (jdcolor.c). On the CPU the
same functions run on planes from any source, which is how the tests check them against
libjpeg-turbo without a GPU.

`gpu_jpeg_supported(header)` says which JPEGs take this path: YCbCr at 4:4:4, 4:2:2 or 4:2:0, or
grayscale, each side at least MIN_SIDE. Everything else stays on the host decoder.

Damaged JPEGs are where the decoders part. On an H200, of 1,931 damaged JPEGs whose headers pass
media.gpu_jpeg_size (bits flipped, runs zeroed, scans cut short, header bytes changed), nvJPEG
crashed on none but recovered 1,164 to other pixels than libjpeg-turbo, and decoded 21 that the
host refuses. The host's decoder says which JPEGs are intact: libjpeg-turbo without a warning
(`intact`: strict, the host path's own first try). Only those keep nvJPEG's pixels; the others
get the host's (decode_frame): then 1,907 of the 1,931 decode as on the host. The other 24 draw
no warning from libjpeg-turbo (15 with a bit flipped in the scan, 9 with a header byte changed)
and still differ (the one inspected by 2 in a saturated pixel's blue): damaged or crafted JPEGs
that libjpeg-turbo decodes without complaint can come out otherwise here. With restart markers
in half the damaged JPEGs: 1,904 as the host, 27 not, every one of them unwarned. Every JPEG an
encoder made that was tried is bit for bit (test_gpu.py). The check is the host's whole entropy
decode (on the H200's host 12.5-14.6 ms for the noisy 1280x720 JPEG, measured while it still
decoded at full size; `intact`), so it runs on a thread of its own while nvJPEG and the GPU work, and the vit waits for it only once its ViT pass is queued
(decode_frame's `checks`; the served first token was not later for it, 55.4 against 56.4 ms).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

MIN_SIDE = 16       # libjpeg upsamples a chroma row of 2 or fewer samples differently (no fancy path)
# simplejpeg.decode_jpeg_header's subsampling -> (horizontal, vertical) chroma factors
SUBSAMPLING = {"444": (1, 1), "422": (2, 1), "420": (2, 2), "Gray": None}

# jdcolor.c's build_ycc_rgb_table: 16-bit fixed point, FIX(x) = (x * 2^16 + 0.5) truncated
_SCALEBITS = 16
_HALF = 1 << (_SCALEBITS - 1)


def _fix(x: float) -> int:
    return int(x * (1 << _SCALEBITS) + 0.5)


@functools.lru_cache(maxsize=8)
def _ycc_tables(device: torch.device) -> torch.Tensor:
    """(4, 256) int32 on `device`: Cr->R, Cb->B, Cr->G (scaled), Cb->G (scaled, plus one half)."""
    x = np.arange(256, dtype=np.int64) - 128
    tables = np.stack([(_fix(1.40200) * x + _HALF) >> _SCALEBITS, (_fix(1.77200) * x + _HALF) >> _SCALEBITS,
                       -_fix(0.71414) * x, -_fix(0.34414) * x + _HALF])
    return torch.from_numpy(tables.astype(np.int32)).to(device)


def ycc_to_rgb(y: torch.Tensor, cb: torch.Tensor, cr: torch.Tensor) -> torch.Tensor:
    """Full-resolution uint8 planes (H, W) -> (H, W, 3) uint8, as libjpeg's ycc_rgb_convert:
    R = y + Cr_r[cr], G = y + ((Cb_g[cb] + Cr_g[cr]) >> 16), B = y + Cb_b[cb], each clamped."""
    t = _ycc_tables(y.device)
    yi, cbi, cri = y.int(), cb.long(), cr.long()
    r = yi + t[0][cri]
    g = yi + ((t[3][cbi] + t[2][cri]) >> _SCALEBITS)
    b = yi + t[1][cbi]
    return torch.stack([r, g, b], dim=-1).clamp_(0, 255).to(torch.uint8)


def _neighbours(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x's samples before and after each along `dim`, the edge sample repeated past each end."""
    n = x.shape[dim]
    before = torch.cat([x.narrow(dim, 0, 1), x.narrow(dim, 0, n - 1)], dim)
    after = torch.cat([x.narrow(dim, 1, n - 1), x.narrow(dim, n - 1, 1)], dim)
    return before, after


def _interleave(even: torch.Tensor, odd: torch.Tensor, dim: int) -> torch.Tensor:
    dim %= even.dim()
    return torch.stack([even, odd], dim=dim + 1).flatten(dim, dim + 1)


def upsample_h2v1(x: torch.Tensor) -> torch.Tensor:
    """Chroma planes (..., h, w) -> (..., h, 2w), h2v1_fancy_upsample: 3/4 of the nearer sample and
    1/4 of the further, rounded down then up ((3a + b + 1) >> 2, (3a + c + 2) >> 2)."""
    xi = x.int()
    left, right = _neighbours(xi, -1)
    return _interleave((3 * xi + left + 1) >> 2, (3 * xi + right + 2) >> 2, -1).to(torch.uint8)


def upsample_h2v2(x: torch.Tensor) -> torch.Tensor:
    """Chroma planes (..., h, w) -> (..., 2h, 2w), h2v2_fancy_upsample: each output row sums 3x its
    nearest input row and 1x the next nearest (above for the upper, below for the lower), then
    across the columns (3 * this + the neighbour's sum + 8 or 7) >> 4: weights 9, 3, 3, 1 over 16."""
    xi = x.int()
    above, below = _neighbours(xi, -2)
    colsum = torch.stack([3 * xi + above, 3 * xi + below], dim=-3)      # (..., upper/lower, h, w)
    left, right = _neighbours(colsum, -1)
    rows = _interleave((3 * colsum + left + 8) >> 4, (3 * colsum + right + 7) >> 4, -1)
    return _interleave(rows.select(-3, 0), rows.select(-3, 1), -2).to(torch.uint8)


def planes_to_rgb(planes: list[torch.Tensor], subsampling: str, height: int, width: int) -> torch.Tensor:
    """Decoded components (Y full size; Cb and Cr at their subsampled size, ceil of each side over
    the factor, or larger: cropped) -> (height, width, 3) uint8, libjpeg-turbo's RGB. Cb and Cr are
    upsampled together (one launch an operation for both)."""
    y = planes[0][:height, :width]
    factors = SUBSAMPLING[subsampling]
    if factors is None:
        return y.unsqueeze(-1).expand(height, width, 3).contiguous()
    fh, fv = factors
    ch, cw = -(-height // fv), -(-width // fh)
    chroma = torch.stack([planes[1][:ch, :cw], planes[2][:ch, :cw]])
    if (fh, fv) == (2, 2):
        chroma = upsample_h2v2(chroma)
    elif (fh, fv) == (2, 1):
        chroma = upsample_h2v1(chroma)
    chroma = chroma[:, :height, :width]
    return ycc_to_rgb(y, chroma[0], chroma[1])


def gpu_jpeg_supported(height: int, width: int, space: str, subsampling: str) -> bool:
    """A JPEG (from its header) whose pixels this module makes libjpeg-turbo's."""
    return (space == "YCbCr" and subsampling in ("444", "422", "420")
            or space == "Gray" and subsampling == "Gray") and min(height, width) >= MIN_SIDE


# -- nvJPEG ------------------------------------------------------------------------------------------

_OUTPUT_Y, _OUTPUT_YUV = 2, 1           # nvjpegOutputFormat_t
_NVJPEG_CSS = {0: "444", 1: "422", 2: "420", 6: "Gray"}     # nvjpegChromaSubsampling_t, the ones used here


class _Image(ctypes.Structure):         # nvjpegImage_t
    _fields_ = [("channel", ctypes.c_void_p * 4), ("pitch", ctypes.c_size_t * 4)]


class NvJpegError(RuntimeError):
    pass


def _library_candidates() -> list[str]:
    names = [os.environ.get("QWEN3VL_NVJPEG_LIBRARY", ""), ctypes.util.find_library("nvjpeg") or ""]
    dirs = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), sub) for sub in ("lib64", "lib")]
    try:
        import site
        roots = site.getsitepackages()
    except AttributeError:
        roots = []
    for root in roots:
        dirs += glob.glob(os.path.join(root, "nvidia", "*", "lib")) + glob.glob(os.path.join(root, "nvidia", "*", "*", "lib"))
        dirs.append(os.path.join(root, "torchvision.libs"))
    for d in dirs:
        names += sorted(glob.glob(os.path.join(d, "libnvjpeg*.so*")), reverse=True)
    return [n for n in names if n]


@functools.lru_cache(maxsize=1)
def library_available() -> bool:
    """Whether an nvJPEG library loads here (without touching CUDA: the launcher asks)."""
    for name in _library_candidates():
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


class NvJpeg:
    """nvJPEG's single-image decoder through its C API (ctypes): one library handle, a decoding
    state per thread (nvJPEG's states are not shared between threads)."""

    def __init__(self, path: str | None = None, backend: int = 0):
        errors = []
        for name in [path] if path else _library_candidates():
            try:
                self.lib = ctypes.CDLL(name)
                self.path = name
                break
            except OSError as e:
                errors.append(f"{name}: {e}")
        else:
            raise NvJpegError("no nvJPEG library found" + (f" ({'; '.join(errors[:3])})" if errors else ""))
        lib = self.lib
        vp, sz, ip = ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_int)
        lib.nvjpegCreateEx.argtypes = [ctypes.c_int, vp, vp, ctypes.c_uint, ctypes.POINTER(vp)]
        lib.nvjpegJpegStateCreate.argtypes = [vp, ctypes.POINTER(vp)]
        lib.nvjpegGetImageInfo.argtypes = [vp, ctypes.c_char_p, sz, ip, ip, ip, ip]
        lib.nvjpegDecode.argtypes = [vp, vp, ctypes.c_char_p, sz, ctypes.c_int, ctypes.POINTER(_Image), vp]
        handle = vp()
        self._check(lib.nvjpegCreateEx(backend, None, None, 0, ctypes.byref(handle)), "nvjpegCreateEx")
        self.handle, self.backend = handle, backend
        self._local = threading.local()

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise NvJpegError(f"{what}: nvJPEG status {status}")

    def _state(self):
        state = getattr(self._local, "state", None)
        if state is None:
            state = ctypes.c_void_p()
            self._check(self.lib.nvjpegJpegStateCreate(self.handle, ctypes.byref(state)), "nvjpegJpegStateCreate")
            self._local.state = state
        return state

    def info(self, data: bytes) -> tuple[str | None, list[tuple[int, int]]]:
        """-> (subsampling as gpu_jpeg_supported names it, or None; each component's (height, width))."""
        n, css = ctypes.c_int(), ctypes.c_int()
        widths, heights = (ctypes.c_int * 4)(), (ctypes.c_int * 4)()
        self._check(self.lib.nvjpegGetImageInfo(self.handle, data, len(data), ctypes.byref(n), ctypes.byref(css),
                                                widths, heights), "nvjpegGetImageInfo")
        return _NVJPEG_CSS.get(css.value), [(heights[i], widths[i]) for i in range(n.value)]

    def decode_planes(self, data: bytes, device: torch.device) -> tuple[str, list[torch.Tensor]]:
        """-> (subsampling, each component as a uint8 (h, w) tensor on `device`), enqueued on the
        device's current stream."""
        subsampling, sizes = self.info(data)
        return subsampling, self._decode(data, device, subsampling, sizes)

    def _decode(self, data: bytes, device: torch.device, subsampling: str | None,
                sizes: list[tuple[int, int]]) -> list[torch.Tensor]:
        if subsampling is None or len(sizes) != (1 if subsampling == "Gray" else 3):
            raise NvJpegError(f"nvJPEG reads this JPEG as {len(sizes)} components, subsampling {subsampling}")
        planes = [torch.empty(h, w, dtype=torch.uint8, device=device) for h, w in sizes]
        image = _Image()
        for i, p in enumerate(planes):
            image.channel[i], image.pitch[i] = p.data_ptr(), p.stride(0)
        stream = torch.cuda.current_stream(device).cuda_stream
        fmt = _OUTPUT_Y if len(planes) == 1 else _OUTPUT_YUV
        self._check(self.lib.nvjpegDecode(self.handle, self._state(), data, len(data), fmt, ctypes.byref(image),
                                          ctypes.c_void_p(stream)), "nvjpegDecode")
        return planes

    def decode_rgb(self, data: bytes, device: torch.device, height: int, width: int) -> torch.Tensor:
        """A JPEG of `height` x `width` pixels -> (height, width, 3) uint8 on `device`, libjpeg-turbo's
        pixels. ValueError when its header says another size (before any memory is taken for it);
        NvJpegError when nvJPEG refuses it or lays its components out otherwise than libjpeg."""
        subsampling, sizes = self.info(data)
        if not sizes or sizes[0] != (height, width):
            raise ValueError(f"a JPEG of {sizes[0][1] if sizes else 0}x{sizes[0][0] if sizes else 0} pixels came "
                             f"with the source size {height}x{width}")
        factors = SUBSAMPLING.get(subsampling or "", (1, 1)) or (1, 1)
        if any(h < -(-height // factors[1]) or w < -(-width // factors[0]) for h, w in sizes[1:]):
            raise NvJpegError(f"nvJPEG's component sizes {sizes} for a {height}x{width} {subsampling} JPEG")
        return planes_to_rgb(self._decode(data, device, subsampling, sizes), subsampling, height, width)


_shared: dict[int, NvJpeg | NvJpegError] = {}
_shared_lock = threading.Lock()


def nvjpeg(backend: int = 0) -> NvJpeg | None:
    """The process's decoder, or None where nvJPEG cannot be loaded (no GPU, no library)."""
    with _shared_lock:
        if backend not in _shared:
            try:
                if not torch.cuda.is_available():
                    raise NvJpegError("no CUDA device")
                _shared[backend] = NvJpeg(backend=backend)
            except NvJpegError as e:
                _shared[backend] = e
        got = _shared[backend]
    return got if isinstance(got, NvJpeg) else None


@functools.lru_cache(maxsize=None)
def _decode_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def _on_decode_stream(device: torch.device, decode):
    """decode() run on the device's decode stream, which nothing queued on its own stream (the ViT
    passes of requests before this one) holds up; its memory is that stream's (the caching
    allocator's pools are per stream). The frame it returns is handed to the device's stream:
    waited for there, and marked as used there."""
    main, side = torch.cuda.current_stream(device), _decode_stream(device)
    with torch.cuda.device(device), torch.cuda.stream(side):
        frame = decode()
    main.wait_stream(side)
    frame.record_stream(main)
    return frame


# where `intact` runs: libjpeg-turbo lets go of the GIL while it decodes, so a request's JPEGs are
# checked side by side, up to 8 at once, as preprocess's media pool would have decoded them
_CHECKS = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="jpeg-intact")


def intact(data: bytes) -> bool:
    """Whether libjpeg-turbo decodes the JPEG without a warning (corrupt entropy data, a scan cut
    short, bytes past its end): where it warns, the host path (media.decode_image_array) hands the
    JPEG to PIL, which recovers its own way, and nvJPEG recovers another. At 1/8 scale (the
    smallest size libjpeg-turbo offers: simplejpeg scales only to a minimum size, and min_factor
    alone leaves it at 1/1): the same entropy decode, every coefficient's code read, without the
    full-size IDCT and colour conversion. On this project's CPU 6,215 fuzzed damaged JPEGs
    (4:2:0 / 4:2:2 / 4:4:4, with and without restart markers) warned at 1/8 exactly where they
    warned at 1/1; the noisy 1280x720 JPEG took 8.2 ms against 11.7, a 12 MP photo-like one 37
    against 63."""
    from .media import simplejpeg

    if simplejpeg is None:
        return False
    try:
        simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True, min_height=1, min_width=1)
    except Exception:       # anything libjpeg-turbo says: the host path's decode answers for it
        return False
    return True


def decode_frame(data: bytes, height: int, width: int, device: torch.device | None = None,
                 checks: list | None = None, gpu: bool = True) -> torch.Tensor:
    """A JPEG that preprocess sent undecoded (media.gpu_jpeg_size) -> its (height * width, 3)
    uint8 pixels on `device`: by nvJPEG where that is a GPU, the library loads and the JPEG is
    `intact`, else (a damaged image, one nvJPEG refuses, or on a CPU) by the host's
    decode_image_array; the same pixels either way (but for the damaged JPEGs that libjpeg-turbo does not warn on: the
    module's docstring). ValueError (the caller's mistake) for an image of another size or one
    that does not decode.

    `checks`: where the caller acts on it, nvJPEG's pixels come back at once and the pending
    `intact` check (a Future of a bool) is appended to it; nothing made from the pixels may
    leave the caller before the check says True, and where it says False the caller decodes
    again with `gpu` False (the host's decode, and no second check). Without it the check is
    waited for here."""
    from .media import decode_image_array

    device = device or torch.device("cpu")
    if gpu and device.type == "cuda" and (decoder := nvjpeg()) is not None:
        check: Future = _CHECKS.submit(intact, data)       # on the host's cores while nvJPEG and the GPU work
        try:
            frame = _on_decode_stream(device, lambda: decoder.decode_rgb(data, device, height, width).view(-1, 3))
        except NvJpegError:
            check.cancel()      # the host decodes it below (a check already running finishes unread)
        else:
            if checks is not None:
                checks.append(check)
                return frame
            if check.result():
                return frame
    pixels = decode_image_array(data, height * width)
    if pixels.shape[:2] != (height, width):
        raise ValueError(f"an image of {pixels.shape[1]}x{pixels.shape[0]} pixels came with the source size "
                         f"{height}x{width}")
    return torch.from_numpy(pixels).view(-1, 3).to(device)
