"""Fetch and decode media: data: URIs, raw base64, http(s) URLs, and allow-listed `file://` URLs.

Fetching is built to face the internet (`MediaPolicy`):
- the host is resolved here and every address is checked before connecting; loopback, private,
  link-local, multicast and reserved addresses (IPv4 and IPv6, mapped and embedded forms too)
  are refused unless `allow_private` is set, on every redirect hop (at most `max_redirects`);
  the connection goes to the address that was checked (no second lookup to rebind);
- `allowed_domains`, when set, is the only hosts fetched from (vLLM's --allowed-media-domains);
- every network failure reads the same "could not fetch media" (the log has the reason), so a
  caller cannot map which ports are open;
- the size limit holds while the body streams in, and one wall-clock deadline covers the whole
  fetch (lookup, connect, redirects, body): a watchdog shuts the socket down when it passes, or
  when the request is cancelled (`Cancel`), so a body that trickles cannot hold a worker.

Every failure a client can cause raises `MediaError` (a RequestError, HTTP 400) with a message
that names what was wrong and never carries a server path or an object's repr.
Images with transparency are composited onto white before RGB, as the reference processor
(transformers >= 5.18) and qwen-vl-utils do. Videos decode with decord where present, else PyAV
(`video_backend()` says which, or None).
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import http.client
import io
import ipaddress
import logging
import os
import re
import socket
import ssl
import tempfile
import threading
import time
import urllib.parse
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .chat import RequestError

try:        # SIMD base64: a 3.7 MB data URI decodes in ~2 ms instead of ~15 (same bytes, same errors)
    from pybase64 import b64decode as _b64decode
except ImportError:
    _b64decode = base64.b64decode

# libjpeg-turbo and libspng into numpy arrays: decode_image's pixels, faster (decode_image_array).
# Optional: without them (or when one cannot load, e.g. built for another numpy), PIL decodes.
try:
    import simplejpeg
except Exception:   # noqa: BLE001  (an extension built for another numpy fails in several ways)
    simplejpeg = None
try:
    import pyspng
except Exception:   # noqa: BLE001
    pyspng = None
try:                # libdeflate: a plain PNG's inflate, ahead of pyspng (_stored_png), and its CRCs
    import deflate
except Exception:   # noqa: BLE001
    deflate = None
# a PNG chunk's CRC-32: libdeflate's (0.13 ms for the noise 1280x720 PNG's walk here) or zlib's (0.76)
_crc32 = deflate.crc32 if deflate is not None else zlib.crc32

log = logging.getLogger(__name__)

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_REDIRECTS = (301, 302, 303, 307, 308)
_resolver = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="media-dns")


class MediaError(RequestError):
    pass


class FetchError(MediaError):
    """The one message for every network failure (refused, reset, timed out, refused address...)."""

    def __init__(self, url: str):
        super().__init__(f"could not fetch media from {_shown(url)}")


@dataclass(frozen=True)
class MediaPolicy:
    allowed_local_dir: str | None = None       # file:// URLs under it; None: refused
    fetch_timeout_s: float = 10.0              # the whole fetch, redirects and body included
    max_bytes: int = 64 * 2**20                # one media item's bytes (fetched, decoded from base64, read)
    allowed_domains: tuple[str, ...] | None = None    # None: any host
    allow_private: bool = False                # loopback/private/link-local addresses (labs, tests)
    max_redirects: int = 3
    max_image_pixels: int = 89_478_485         # decoded size limit (PIL's own default); bombs past it are refused
    max_video_bytes: int = 2**31               # decoded frames held at once (frames x H x W x 3)


TRUSTED = MediaPolicy(allowed_local_dir="/", allow_private=True, max_bytes=2**40)   # the one-shot CLI


class Cancel:
    """Set once, from any thread; callbacks run when it is set (or at once if it already is)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._set = False
        self._callbacks: list = []

    def cancel(self) -> None:
        with self._lock:
            if self._set:
                return
            self._set, callbacks, self._callbacks = True, self._callbacks, []
        for fn in callbacks:
            fn()

    @property
    def is_set(self) -> bool:
        return self._set

    def on_cancel(self, fn) -> None:
        with self._lock:
            if not self._set:
                self._callbacks.append(fn)
                return
        fn()

    def remove(self, fn) -> None:
        with self._lock:
            if fn in self._callbacks:
                self._callbacks.remove(fn)


def fetch_bytes(source, policy: MediaPolicy, cancel: Cancel | None = None) -> bytes:
    """A media reference's bytes: data: URI, http(s) URL, file:// URL, or raw base64."""
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    if not isinstance(source, str):
        raise MediaError(f"media source must be a string, got {type(source).__name__}")
    if source.startswith("data:"):
        header, _, payload = source.partition(",")
        if ";base64" not in header:
            raise MediaError("data: URIs must be base64 encoded")
        return _b64(payload, policy)
    scheme = source.split("://", 1)[0].lower() if _SCHEME.match(source) else None
    if scheme in ("http", "https"):
        return _http_get(source, policy, cancel or Cancel())
    if scheme == "file":
        return _read_local(source, policy)
    if scheme is not None:
        raise MediaError(f"media URL scheme {scheme!r} is not supported (use http(s), data: or file://)")
    return _b64(source, policy)     # raw base64, as Triton's `image` input carries it (vllm_backend's convention)


def _b64(payload: str, policy: MediaPolicy) -> bytes:
    payload = payload.strip()
    if len(payload) // 4 * 3 > policy.max_bytes:
        raise MediaError(f"media is larger than the {policy.max_bytes} byte limit")
    try:
        return _b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("media is not valid base64 (expected a data: URI, an http(s) or file:// URL, "
                         "or base64 bytes)") from None


# -- http(s) ---------------------------------------------------------------------------------------

def address_allowed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Only globally routable unicast addresses, also when hidden inside an IPv6 form."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if inner is None and ip in ipaddress.IPv6Network("64:ff9b::/96"):      # NAT64
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if inner is not None and not address_allowed(inner):
            return False
    return ip.is_global and not (ip.is_multicast or ip.is_private or ip.is_loopback or ip.is_link_local
                                 or ip.is_reserved or ip.is_unspecified)


def _http_get(url: str, policy: MediaPolicy, cancel: Cancel) -> bytes:
    deadline = time.monotonic() + policy.fetch_timeout_s
    current = url
    for _ in range(policy.max_redirects + 1):
        status, location, body = _one_hop(url, current, policy, cancel, deadline)
        if status in _REDIRECTS:
            if not location:
                raise _failed(url, "redirect without a Location")
            current = urllib.parse.urljoin(current, location)
            continue
        if status != 200:
            raise _failed(url, f"HTTP {status}")
        return body
    raise _failed(url, f"more than {policy.max_redirects} redirects")


def _one_hop(url: str, current: str, policy: MediaPolicy, cancel: Cancel, deadline: float):
    """GET one URL at a checked address. -> (status, location, body or b"")."""
    parts = urllib.parse.urlsplit(current)
    scheme, host = parts.scheme.lower(), parts.hostname
    if scheme not in ("http", "https") or not host:
        raise _failed(url, f"unsupported redirect target {current!r}")
    if parts.username or parts.password:
        raise MediaError("media URLs must not carry credentials")
    if policy.allowed_domains is not None and host.lower() not in policy.allowed_domains:
        raise MediaError(f"media host {host!r} is not in this server's allowed media domains")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise MediaError("media URL has an invalid port") from None
    ip = _resolve(url, host, port, policy, deadline)
    conn = _connection(scheme, host, port, ip, deadline)
    watchdog = _Watchdog(conn, deadline, cancel)
    try:
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("GET", path, headers={"Host": parts.netloc.rsplit("@", 1)[-1], "Accept-Encoding": "identity",
                                           "User-Agent": "qwen3vl-triton"})
        resp = conn.getresponse()
        if resp.status != 200:
            return resp.status, resp.getheader("Location"), b""
        length = resp.getheader("Content-Length")
        if length and length.isdigit() and int(length) > policy.max_bytes:
            raise MediaError(f"media at {_shown(url)} is larger than the {policy.max_bytes} byte limit")
        chunks, total = [], 0
        while chunk := resp.read(65536):
            total += len(chunk)
            if total > policy.max_bytes:
                raise MediaError(f"media at {_shown(url)} is larger than the {policy.max_bytes} byte limit")
            chunks.append(chunk)
        if watchdog.fired:
            raise _failed(url, watchdog.why)
        return 200, None, b"".join(chunks)
    except MediaError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise _failed(url, watchdog.why or f"{type(e).__name__}: {e}") from None
    finally:
        watchdog.stop()
        conn.close()


def _resolve(url: str, host: str, port: int, policy: MediaPolicy, deadline: float) -> str:
    """The first allowed address of the host, looked up within the deadline."""
    try:
        literal = ipaddress.ip_address(host)
        candidates = [literal]
    except ValueError:
        future = _resolver.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
        try:
            infos = future.result(timeout=max(0.0, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            raise _failed(url, "name lookup timed out") from None
        except OSError as e:
            raise _failed(url, f"name lookup failed: {e}") from None
        candidates = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
    allowed = [ip for ip in candidates if policy.allow_private or address_allowed(ip)]
    if not allowed:
        raise _failed(url, f"{host} resolves only to refused addresses {[str(ip) for ip in candidates]}")
    return str(allowed[0])


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to an address already checked; Host (and TLS SNI) stay the URL's host."""

    def __init__(self, host, port, ip, timeout):
        super().__init__(host, port, timeout=timeout)
        self._ip, self.live_sock = ip, None

    def connect(self):
        # kept apart from `sock`, which http.client clears once a response owns the connection
        self.sock = self.live_sock = socket.create_connection((self._ip, self.port), self.timeout)


_tls: ssl.SSLContext | None = None


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host, port, ip, timeout):
        global _tls
        _tls = _tls or ssl.create_default_context()       # loading the CA store once, not per fetch
        super().__init__(host, port, timeout=timeout, context=_tls)
        self._ip, self.live_sock = ip, None

    def connect(self):
        self.live_sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self.live_sock = self._context.wrap_socket(self.live_sock, server_hostname=self.host)


def _connection(scheme, host, port, ip, deadline):
    cls = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
    return cls(host, port, ip, max(0.01, deadline - time.monotonic()))


class _Watchdog:
    """Shuts the connection's socket down at the deadline or on cancel: any blocked connect, TLS
    handshake or read returns at once, however slowly the peer trickles bytes."""

    def __init__(self, conn, deadline: float, cancel: Cancel):
        self.conn, self.cancel, self.fired, self.why = conn, cancel, False, ""
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._fire, ("deadline passed",))
        self._timer.daemon = True
        self._timer.start()
        self._on_cancel = lambda: self._fire("request cancelled")
        cancel.on_cancel(self._on_cancel)

    def _fire(self, why: str) -> None:
        self.fired, self.why = True, why
        sock = self.conn.live_sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        else:            # still connecting: the connect's own timeout is the deadline too
            self.conn.timeout = 0.01

    def stop(self) -> None:
        self._timer.cancel()
        self.cancel.remove(self._on_cancel)


def _failed(url: str, reason: str) -> FetchError:
    log.info("media fetch of %s failed: %s", _shown(url), reason)
    return FetchError(url)


def _shown(url: str) -> str:
    return url if len(url) <= 200 else url[:197] + "..."


# -- local files -----------------------------------------------------------------------------------

def _read_local(url: str, policy: MediaPolicy) -> bytes:
    if policy.allowed_local_dir is None:
        raise MediaError("local media (file:// URLs) is disabled on this server")
    path = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
    real = os.path.realpath(path)
    root = os.path.realpath(policy.allowed_local_dir)
    if os.path.commonpath([real, root]) != root:
        raise MediaError("file:// media must be under the server's allowed local media path")
    if not os.path.isfile(real):
        raise MediaError(f"local media file {_shown(url)} does not exist")
    if os.path.getsize(real) > policy.max_bytes:
        raise MediaError(f"local media file is larger than the {policy.max_bytes} byte limit")
    return Path(real).read_bytes()


# -- decoding --------------------------------------------------------------------------------------

def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """Refuse an image whose header's size is past the pixel limit, before any pixel is decoded."""
    if width * height > max_pixels:
        raise MediaError(f"image of {width}x{height} pixels is larger than the {max_pixels} pixel limit")


def decode_image(data: bytes, max_pixels: int = MediaPolicy.max_image_pixels) -> Image.Image:
    """Bytes -> RGB PIL image. Transparency (RGBA, LA, P or L with a transparent index) is
    composited onto white first, as transformers' convert_to_rgb does. The size is checked from
    the header before any pixel is decoded."""
    try:
        img = Image.open(io.BytesIO(data))
        check_pixels(*img.size, max_pixels)
        img.load()
        if "A" in img.getbands() or img.info.get("transparency") is not None:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img if img.mode == "RGB" else img.convert("RGB")
    except MediaError:
        raise
    except Image.DecompressionBombError:
        raise MediaError(f"image is larger than the {max_pixels} pixel limit") from None
    except MemoryError:
        raise
    except Exception:   # PIL raises many types (OSError, SyntaxError, struct.error, ...) on damaged data
        raise MediaError("media is not a decodable image (unknown format or damaged data)") from None


def decode_image_array(data: bytes, max_pixels: int = MediaPolicy.max_image_pixels) -> np.ndarray:
    """Bytes -> (H, W, 3) uint8 RGB, writable: decode_image's pixels as an array.

    JPEGs in YCbCr or grayscale decode through simplejpeg where it is installed: libjpeg-turbo
    with the same settings as PIL's (accurate integer DCT, smooth chroma upsampling), straight
    into the array. The pixels are the same (tests compare them); a noisy 1280x720 JPEG at
    quality 90 took 10.3 ms against PIL's 12.8 ms, and the copy out of PIL's image (~1 ms) is
    gone. Plain PNGs (_plain_png_header, _plain_png_chunks: 8-bit gray, RGB, gray + alpha or RGBA,
    whose alpha is composited onto white by PIL's arithmetic, ON_WHITE, or palettes without
    transparency) decode through pyspng (libspng),
    lossless and so the same pixels: the noisy 1280x720 PNG in 17.3 ms with the CRC walk against
    PIL's 24.6 (the GPU host: 15-19 ms against 25-38); the walk runs beside the decode, and a
    PNG it does not vouch for (damaged, or with tRNS) goes to PIL after. Where libdeflate is
    installed it inflates the image data first, and pyspng unfilters it from stored blocks
    (_stored_png). Everything else, and any image that
    these decoders refuse (PIL may accept a recoverable one, or refuse it with its own message),
    goes through decode_image."""
    if simplejpeg is not None and data[:3] == b"\xff\xd8\xff":
        try:
            h, w, space, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError:
            space = None
        if space in ("YCbCr", "Gray"):
            check_pixels(w, h, max_pixels)
            try:
                return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
            except ValueError:
                pass
    elif pyspng is not None and data[:8] == _PNG_SIGNATURE:
        size = _plain_png_header(data)
        if size is not None:
            w, h = size
            check_pixels(w, h, max_pixels)
            intact = BESIDE_DECODE.submit(_plain_png_chunks, data)    # while this thread decodes
            alpha = data[25] in (4, 6)
            try:
                out = pyspng.load(_stored_png(data, w, h) or data, "RGBA" if alpha else "RGB")
            except RuntimeError:
                out = None
            if intact.result() and out is not None and out.shape == (h, w, 3 + alpha) and out.dtype == np.uint8:
                return _on_white(out) if alpha else out
    return np.asarray(decode_image(data, max_pixels), dtype=np.uint8).copy()


# start-of-frame markers: the frame's coding (baseline C0, extended sequential C1, progressive C2, ...)
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_layout(data: bytes) -> dict | None:
    """A JPEG's coding as its marker segments up to the first scan tell it: the start-of-frame
    marker ("sof": C0 baseline, C1 extended sequential, C2 progressive, ...), "precision" (bits a
    sample), "components" (the frame's) and "scan_components" (the first scan's). None where they
    do not parse that far."""
    pos, n, out = 2, len(data), {}
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:                          # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:   # no length
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2 or pos + 2 + length > n or marker == 0xD9:
            return None
        body = data[pos + 4:pos + 2 + length]
        if marker in _JPEG_SOF:
            if "sof" in out or len(body) < 6:
                return None
            out.update(sof=marker, precision=body[0], components=body[5])
        elif marker == 0xDA:
            return {**out, "scan_components": body[0]} if "sof" in out and body else None
        pos += 2 + length
    return None


def gpu_jpeg_size(data: bytes, max_pixels: int = MediaPolicy.max_image_pixels) -> tuple[int, int] | None:
    """(height, width) of a JPEG that jpeg_gpu decodes to decode_image_array's pixels, from its
    header alone; None for any other image (the host decodes it). Those are sequential 8-bit
    JPEGs (baseline or extended: progressive ones come out of nvJPEG a few levels off, measured)
    in YCbCr at 4:4:4, 4:2:2 or 4:2:0, or grayscale, of one scan of every component, with or
    without restart markers (what was compared with the host's pixels on an H200: restart
    intervals of 1 and 7 MCUs and of 1 and 3 MCU rows, as cameras write them, came out the same),
    that end in their end-of-image marker (a truncated one is the host's to refuse). MediaError
    past `max_pixels`, as the host's decode."""
    if simplejpeg is None or data[:3] != b"\xff\xd8\xff" or data[-2:] != b"\xff\xd9":
        return None
    try:
        h, w, space, subsampling = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    from .jpeg_gpu import gpu_jpeg_supported

    layout = jpeg_layout(data)
    if (not gpu_jpeg_supported(h, w, space, subsampling) or layout is None or layout["sof"] not in (0xC0, 0xC1)
            or layout["precision"] != 8 or layout["scan_components"] != layout["components"]):
        return None
    check_pixels(w, h, max_pixels)
    return h, w


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_MAX_CHUNKS = 16384       # past this many, PIL's path: the walk is Python, a chunk at a time
# work beside an item's decode (hashlib and zlib let go of the GIL): the PNG chunk walk that
# vouches for pyspng's output (1.1 ms of a 2.8 MB PNG's 19 ms here), and the processor's hash of
# the item's bytes (~1.4 ms for that PNG). As many threads as the media pool runs items by default
# (--mm-max-concurrent-calls 32), so a busy server's side work does not queue
BESIDE_DECODE = concurrent.futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="media-beside")


def _plain_png_header(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the IHDR of a PNG that pyspng decodes to decode_image's pixels, as far
    as the header tells: 8-bit gray, RGB, gray + alpha or RGBA, or a palette of 1 to 8 bits (a
    palette with tRNS is PIL's: _plain_png_chunks). None: PIL's path."""
    if len(data) < 33 or data[8:16] != b"\x00\x00\x00\x0dIHDR":
        return None
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    depth, colour = data[24], data[25]
    plain = (depth == 8 and colour in _PNG_CHANNELS) or (colour == 3 and depth in (1, 2, 4, 8))
    return (w, h) if plain and w and h else None


_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}     # colour type -> channels: gray, RGB, gray + alpha, RGBA


def _on_white_table() -> np.ndarray:
    """(alpha, colour) -> the colour over opaque white, uint8 (256, 256), as decode_image's
    Image.alpha_composite(white, image) gives it (libImaging/AlphaComposite.c with the destination
    white and opaque: coefficients a * 128 and (255 - a) * 128, its rounded division by 255, a
    shift by 7; every pair checked against PIL in tests)."""
    a = np.arange(256, dtype=np.int32)[:, None]
    t = np.arange(256, dtype=np.int32)[None, :] * a * 128 + (255 - a) * (255 * 128) + (0x80 << 7)
    return ((((t >> 8) + t) >> 8) >> 7).astype(np.uint8)


ON_WHITE = _on_white_table()


def _on_white(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 -> (H, W, 3) over white (ON_WHITE). Where few pixels are not opaque (a
    screenshot's corners and shadows) only those are looked up; past an eighth of them, every
    byte is, in one pass (this machine, 1280x720: opaque 14.6 ms with the decode, PIL's path 33;
    all translucent ~25, PIL 36)."""
    alpha = rgba[..., 3]
    translucent = alpha != 255
    if np.count_nonzero(translucent) > alpha.size // 8:
        return np.take(ON_WHITE.ravel(), (alpha[..., None].astype(np.uint16) << 8) | rgba[..., :3])
    rgb = np.ascontiguousarray(rgba[..., :3])
    ys, xs = np.nonzero(translucent)
    if len(ys):
        rgb[ys, xs] = ON_WHITE[alpha[ys, xs][:, None], rgb[ys, xs]]
    return rgb


def png_image_data(data: bytes) -> bytes | None:
    """A PNG's IDAT chunks' bytes joined (its zlib stream), up to IEND; None where the chunks do
    not reach one. Their CRCs are not checked here (_plain_png_chunks does, beside the inflate)."""
    pos, view, parts = 8, memoryview(data), []
    for _ in range(_PNG_MAX_CHUNKS):
        if pos + 12 > len(data):
            return None
        n = int.from_bytes(data[pos:pos + 4], "big")
        kind, end = data[pos + 4:pos + 8], pos + 12 + n
        if end > len(data):
            return None
        if kind == b"IDAT":
            parts.append(view[pos + 8:end - 4])
        if kind == b"IEND":
            return b"".join(parts)
        pos = end
    return None


def inflate_png(data: bytes, size: int) -> tuple[bytes, bytes] | None:
    """A PNG's zlib stream (png_image_data) and the `size` bytes libdeflate inflates it to (its
    scanlines); None where libdeflate is missing, the chunks do not reach IEND, or the stream does
    not inflate to exactly `size` bytes with its adler32 intact."""
    stream = png_image_data(data) if deflate is not None else None
    if stream is None or len(stream) < 6:
        return None
    try:
        raw = deflate.zlib_decompress(stream, size)
    except Exception:   # noqa: BLE001  (deflate.DeflateError: damaged, short or long stream, bad checksum)
        return None
    return (stream, raw) if len(raw) == size else None      # libdeflate returns a short stream's bytes


_STORED = 65535         # a stored deflate block's most bytes
# scanlines past this many bytes (a 4096x4096 RGBA image's) go to pyspng whole: the wrap holds
# them twice, and libdeflate takes the whole output buffer before it reads a byte
_STORED_MAX = 1 << 26


def _stored_png(data: bytes, w: int, h: int) -> bytes | None:
    """A plain PNG (_plain_png_header) -> the same image as a PNG of its IHDR,
    one IDAT whose zlib stream holds the inflated scanlines in stored blocks, and IEND: libdeflate
    inflates (a noisy 1280x720 PNG: 8.9 ms on the GPU host, where pyspng's zlib took most of its
    21.9 ms), and pyspng is left only the unfiltering (1.5 ms on this machine: a stored block is
    a copy). Ancillary chunks are dropped: pyspng's pixels do not depend on them (no gamma),
    and tRNS sends the image to PIL (_plain_png_chunks). The adler32 is the original stream's,
    which libdeflate checked against these bytes. None where libdeflate is missing, the image is
    interlaced or has a palette (small streams, and its PLTE would have to come along), its
    scanlines pass _STORED_MAX bytes, or the stream does not inflate to exactly the scanlines:
    pyspng then takes the original."""
    if deflate is None or data[28] != 0 or data[25] not in _PNG_CHANNELS:    # Adam7, palettes: pyspng's alone
        return None
    size = h * (1 + w * _PNG_CHANNELS[data[25]])
    if size > _STORED_MAX:                  # large: pyspng's alone
        return None
    inflated = inflate_png(data, size)
    if inflated is None:
        return None
    stream, raw = inflated
    blocks = -(-size // _STORED)
    zlen = 2 + 5 * blocks + size + 4
    out = bytearray(33 + 8 + zlen + 4 + 12)
    out[:33] = data[:33]                # signature and IHDR (its CRC checked by _plain_png_chunks)
    out[33:41] = zlen.to_bytes(4, "big") + b"IDAT"
    out[41:43] = b"\x78\x01"          # zlib: deflate, 32 KB window, no preset dictionary
    pos, src = 43, memoryview(raw)
    for i in range(blocks):
        start = i * _STORED
        n = min(_STORED, size - start)
        out[pos:pos + 5] = bytes((i == blocks - 1,)) + n.to_bytes(2, "little") + (n ^ 0xFFFF).to_bytes(2, "little")
        out[pos + 5:pos + 5 + n] = src[start:start + n]
        pos += 5 + n
    out[pos:pos + 4] = stream[-4:]      # adler32 of the scanlines
    pos += 4
    out[pos:pos + 4] = _crc32(memoryview(out)[37:pos]).to_bytes(4, "big")
    out[pos + 4:] = b"\x00\x00\x00\x00IEND\xaeB`\x82"
    return bytes(out)


def _plain_png_chunks(data: bytes) -> bool:
    """The rest of what pyspng needs to give decode_image's pixels: no tRNS chunk (transparency is
    composited onto white, PIL's path), an IEND, and every chunk's CRC intact. libspng, as pyspng
    calls it, decodes past a chunk's bad CRC and a zlib stream's bad checksum, where PIL refuses
    the image; so the CRCs are checked here (_crc32: 0.13 ms for a 2.8 MB PNG here, 0.75 with
    zlib's) and any damage is left to decode_image to refuse."""
    pos, view = 8, memoryview(data)
    for _ in range(_PNG_MAX_CHUNKS):
        if pos + 12 > len(data):
            return False
        n = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        end = pos + 12 + n
        if end > len(data) or _crc32(view[pos + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            return False
        if kind == b"tRNS":
            return False
        if kind == b"IEND":
            return True
        pos = end
    return False


@dataclass
class DecodedVideo:
    frames: np.ndarray            # (T, H, W, 3) uint8, the sampled frames only
    frame_indices: list[int]      # index of each sampled frame in the source
    fps: float                    # source frame rate
    total_frames: int


def video_backend() -> str | None:
    """Which video decoder this process has: "decord", "pyav", or None."""
    for module, name in (("decord", "decord"), ("av", "pyav")):
        try:
            __import__(module)
            return name
        except ImportError:
            continue
    return None


def decode_video(data: bytes, pick_indices, policy: MediaPolicy = TRUSTED, cancel: Cancel | None = None) -> DecodedVideo:
    """Decode `pick_indices(total_frames, fps)` frames of a video file's bytes."""
    backend = video_backend()
    if backend is None:
        raise MediaError("this server has no video decoder (install decord or PyAV): video input is unavailable")
    try:
        if backend == "decord":
            return _decode_decord(data, pick_indices, policy)
        return _decode_av(data, pick_indices, policy, cancel)
    except (MediaError, MemoryError):
        raise
    except Exception:    # decord's DECORDError, FFmpeg's errors, ...: damaged or unsupported data
        raise MediaError("media is not a decodable video (unknown format or damaged data)") from None


def _check_frames(n: int, h: int, w: int, policy: MediaPolicy) -> None:
    if h * w > policy.max_image_pixels or n * h * w * 3 > policy.max_video_bytes:
        raise MediaError(f"video of {n} sampled {w}x{h} frames is larger than this server decodes")


def _decode_decord(data: bytes, pick_indices, policy: MediaPolicy) -> DecodedVideo:
    import decord

    with tempfile.NamedTemporaryFile(suffix=".video") as f:
        f.write(data)
        f.flush()
        vr = decord.VideoReader(f.name, ctx=decord.cpu(0), num_threads=1)
        total, fps = len(vr), float(vr.get_avg_fps())
        if total == 0:
            raise MediaError("video has no frames")
        idx = list(pick_indices(total, fps))
        h, w = vr[0].shape[:2]
        _check_frames(len(idx), h, w, policy)
        frames = vr.get_batch(idx).asnumpy()
    return DecodedVideo(frames, idx, fps, total)


def _decode_av(data: bytes, pick_indices, policy: MediaPolicy, cancel: Cancel | None) -> DecodedVideo:
    """Two passes: count the frames from the packets (no decoding), then decode keeping only the
    sampled ones, so a long video never sits in memory whole."""
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 24)
        total = sum(1 for p in container.demux(stream) if p.size)
    if total == 0:
        raise MediaError("video has no frames")
    idx = list(pick_indices(total, fps))
    wanted: dict[int, int] = {}
    for i in idx:
        wanted[i] = wanted.get(i, 0) + 1
    picked: dict[int, np.ndarray] = {}
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        _check_frames(len(idx), stream.height, stream.width, policy)
        for n, frame in enumerate(container.decode(stream)):
            if cancel is not None and cancel.is_set:
                raise MediaError("request cancelled")
            if n in wanted:
                picked[n] = frame.to_ndarray(format="rgb24")
            if n >= idx[-1]:
                break
    last = max(picked) if picked else None
    if last is None:
        raise MediaError("video has no decodable frames")
    frames = [picked.get(i, picked[last]) for i in idx]     # a container that over-counted: repeat the last
    return DecodedVideo(np.stack(frames), idx, fps, total)
