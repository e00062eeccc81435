"""Media fetching that can face the internet, against a hostile HTTP server of our own on loopback.

Loopback is itself a refused address, so each test that needs to reach the server opts in to
private addresses (`allow_private=True`); the refusal itself is tested without it.
"""

import base64
import http.server
import ipaddress
import socket
import struct
import threading
import time
import zlib

import pytest

from conftest import image_bytes, make_image
from qwen3vl_backend.processing.media import (Cancel, FetchError, MediaError, MediaPolicy, address_allowed,
                                              decode_image, decode_video, fetch_bytes)

PNG = image_bytes(make_image(40, 30, 1))
CHUNKS = 4096                      # 64 MiB offered by the chunked endpoint
LAB = MediaPolicy(allow_private=True, fetch_timeout_s=2.0, max_bytes=64 * 1024, max_redirects=3)


class Hostile(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    sent: dict = {}

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/ok.png":
            return self._send(PNG, "image/png")
        if path == "/page.html":
            return self._send(b"<html><body>not an image</body></html>", "text/html")
        if path == "/big-declared":
            return self._send(b"x" * (LAB.max_bytes + 1), "image/png")
        if path == "/big-chunked":                 # no Content-Length: the limit must hold while streaming
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            sent = 0
            try:
                for _ in range(CHUNKS):
                    chunk = b"y" * 16384
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    sent += len(chunk)
            except OSError:
                pass
            Hostile.sent["big-chunked"] = sent
            return
        if path == "/trickle":                      # one byte at a time, forever: headers first
            self.send_response(200)
            self.send_header("Connection", "close")  # no length: the body runs until the server closes
            self.end_headers()
            try:
                for _ in range(600):
                    self.wfile.write(b"z")
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass
            return
        if path.startswith("/hop/"):               # /hop/N redirects N more times, then to ok.png
            n = int(path.rsplit("/", 1)[1])
            target = f"/hop/{n - 1}" if n > 1 else "/ok.png"
            return self._redirect(target)
        if path == "/to-closed-port":
            return self._redirect(f"http://127.0.0.1:{CLOSED_PORT}/x.png")
        self._send(b"nope", "text/plain", 404)

    def _send(self, body, ctype, status=200):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass

    def _redirect(self, location):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CLOSED_PORT = _closed_port()


@pytest.fixture(scope="module")
def hostile():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.mark.parametrize("ip,ok", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
    ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
    ("255.255.255.255", False), ("240.0.0.1", False), ("::1", False), ("::", False), ("fe80::1", False),
    ("fc00::1", False), ("ff02::1", False), ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False),
    ("64:ff9b::7f00:1", False), ("2002:7f00:1::1", False), ("2001:db8::1", False),
])
def test_only_public_unicast_addresses_are_fetched(ip, ok):
    assert address_allowed(ipaddress.ip_address(ip)) is ok


@pytest.mark.parametrize("url", ["http://127.0.0.1:{port}/ok.png", "http://localhost:{port}/ok.png",
                                 "http://[::1]:{port}/ok.png", "http://0.0.0.0:{port}/ok.png",
                                 "http://2130706433:{port}/ok.png"])
def test_loopback_is_refused_by_default_with_the_uniform_message(hostile, url):
    port = hostile.rsplit(":", 1)[1]
    with pytest.raises(FetchError, match="^could not fetch media from "):
        fetch_bytes(url.format(port=port), MediaPolicy(fetch_timeout_s=2))
    assert fetch_bytes(f"{hostile}/ok.png", LAB) == PNG          # the same server, opted in


def test_open_and_closed_ports_read_the_same(hostile):
    port = hostile.rsplit(":", 1)[1]
    messages = set()
    for url in (f"http://127.0.0.1:{port}/missing.png", f"http://127.0.0.1:{CLOSED_PORT}/x.png",
                f"{hostile}/to-closed-port"):
        with pytest.raises(FetchError) as e:
            fetch_bytes(url, LAB)
        messages.add(str(e.value).split(" from ")[0])
    assert messages == {"could not fetch media"}


def test_redirects_are_followed_a_few_hops_and_each_hop_is_checked(hostile):
    assert fetch_bytes(f"{hostile}/hop/3", LAB) == PNG
    with pytest.raises(FetchError):
        fetch_bytes(f"{hostile}/hop/4", LAB)
    # a public first hop that redirects to loopback is refused at the redirect: the check runs per hop
    from qwen3vl_backend.processing import media

    hops = []
    real = media._resolve

    def resolve(url, host, port, policy, deadline):
        hops.append(host)
        return real(url, host, port, policy, deadline)
    media._resolve = resolve
    try:
        with pytest.raises(FetchError):
            fetch_bytes(f"{hostile}/hop/1", MediaPolicy(allow_private=False, fetch_timeout_s=2))
    finally:
        media._resolve = real
    assert hops == ["127.0.0.1"]


def test_size_limit_holds_while_streaming(hostile):
    with pytest.raises(MediaError, match=f"larger than the {LAB.max_bytes} byte limit"):
        fetch_bytes(f"{hostile}/big-declared", LAB)
    with pytest.raises(MediaError, match="byte limit"):
        fetch_bytes(f"{hostile}/big-chunked", LAB)
    time.sleep(0.2)
    assert Hostile.sent["big-chunked"] < CHUNKS * 16384         # the server was cut off, not read to the end


def test_a_trickling_body_is_cut_at_the_deadline(hostile):
    start = time.monotonic()
    with pytest.raises(FetchError):
        fetch_bytes(f"{hostile}/trickle", LAB)
    assert time.monotonic() - start < LAB.fetch_timeout_s + 1.0


def test_a_fetch_ends_when_its_request_is_cancelled(hostile):
    cancel = Cancel()
    threading.Timer(0.3, cancel.cancel).start()
    start = time.monotonic()
    with pytest.raises(FetchError):
        fetch_bytes(f"{hostile}/trickle", MediaPolicy(allow_private=True, fetch_timeout_s=30), cancel)
    assert time.monotonic() - start < 2.0


def test_html_is_fetched_but_refused_as_an_image(hostile):
    data = fetch_bytes(f"{hostile}/page.html", LAB)
    with pytest.raises(MediaError, match="not a decodable image") as e:
        decode_image(data)
    assert "BytesIO" not in str(e.value) and "0x" not in str(e.value)


def test_domain_allow_list(hostile):
    policy = MediaPolicy(allow_private=True, allowed_domains=("images.example.com",))
    with pytest.raises(MediaError, match="'127.0.0.1' is not in this server's allowed media domains"):
        fetch_bytes(f"{hostile}/ok.png", policy)
    assert fetch_bytes(f"{hostile}/ok.png", MediaPolicy(allow_private=True, allowed_domains=("127.0.0.1",))) == PNG


@pytest.mark.parametrize("url,message", [
    ("ftp://example.com/x.png", "scheme 'ftp' is not supported"),
    ("gopher://example.com/", "scheme 'gopher' is not supported"),
    ("http://user:pw@example.com/x.png", "must not carry credentials"),
    ("/etc/passwd", "not valid base64"),                # a bare path is not a file: only file:// URLs are
    ("file:///etc/passwd", "file:// URLs\\) is disabled"),
])
def test_other_sources_are_refused(url, message):
    with pytest.raises(MediaError, match=message):
        fetch_bytes(url, MediaPolicy())


def test_raw_base64_jpeg_is_base64_not_a_path():
    jpeg = image_bytes(make_image(32, 32, 5), "JPEG")
    raw = base64.b64encode(jpeg).decode()
    assert raw.startswith("/9j/")
    assert fetch_bytes(raw, MediaPolicy()) == jpeg


def _png_header_only(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of any size, a few hundred bytes: a decompression bomb."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = zlib.compress(b"\x00" * ((width + 7) // 8 + 1) * 64)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def test_decompression_bomb_is_refused_before_decoding():
    bomb = _png_header_only(30000, 30000)
    assert len(bomb) < 10_000
    start = time.monotonic()
    with pytest.raises(MediaError, match="is larger than the 89478485 pixel limit"):
        decode_image(bomb)
    with pytest.raises(MediaError, match="12000x8000 pixels is larger than the 89478485 pixel limit"):
        decode_image(_png_header_only(12000, 8000))         # past the limit, short of PIL's own 2x refusal
    assert time.monotonic() - start < 1.0
    with pytest.raises(MediaError, match="larger than the 1000 pixel limit"):
        decode_image(PNG, max_pixels=1000)


def test_damaged_video_is_a_client_error(video_file):
    data = video_file.read_bytes()
    damaged = data[:200] + bytes(len(data) - 200)
    with pytest.raises(MediaError, match="not a decodable video"):
        decode_video(damaged, lambda total, fps: list(range(min(total, 4))))
    with pytest.raises(MediaError, match="not a decodable video"):
        decode_video(b"\x00" * 1000, lambda total, fps: [0])


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P-transparent"])
def test_transparency_is_composited_onto_white_as_the_reference(mode):
    oracle = pytest.importorskip("oracle")   # noqa: F841  (transformers with its vision deps)
    import numpy as np
    from transformers.image_transforms import convert_to_rgb

    img = make_image(24, 16, 3, "RGBA")
    if mode == "LA":
        img = img.convert("LA")
    elif mode == "P-transparent":
        img = make_image(24, 16, 3, "P")
        img.info["transparency"] = 0
    ours = np.asarray(decode_image(image_bytes(img)))
    from PIL import Image
    import io
    ref = convert_to_rgb(Image.open(io.BytesIO(image_bytes(img))), return_numpy=True)
    assert ours.shape == ref.shape and (ours == ref).all()
    assert (ours != np.asarray(Image.open(io.BytesIO(image_bytes(img))).convert("RGB"))).any()   # not dropped


def test_the_adapter_inlines_remote_urls_in_any_case_and_leaves_data_uris_alone(tmp_path):
    """The adapter picks the URLs to fetch by their scheme's first bytes (a data: URI is megabytes;
    splitting and lowercasing it whole cost ~3 ms an image): data: URIs pass untouched, file:// and
    http(s):// in any case are fetched and inlined."""
    import asyncio

    from openai_frontend.media import MediaFetcher
    from qwen3vl_backend.processing.media import Cancel, MediaPolicy

    (tmp_path / "a.bin").write_bytes(b"\x89PNG-ish")
    fetcher = MediaFetcher(MediaPolicy(allowed_local_dir=str(tmp_path)), 2, 5.0)
    data = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD"}},
                                         {"type": "text", "text": "file://not/a/url"}]}]
    assert asyncio.run(fetcher.inline(data, Cancel())) is data
    local = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"FILE://{tmp_path}/a.bin"}}]}]
    out = asyncio.run(fetcher.inline(local, Cancel()))
    assert out[0]["content"][0]["image_url"]["url"] == "data:application/octet-stream;base64,iVBORy1pc2g="


def _jpeg(img, **kw) -> bytes:
    import io
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _jpeg_cases():
    from PIL import Image

    img = make_image(53, 37, 11)          # odd sizes: partial MCUs in both directions
    trns = img.copy()
    trns.info["transparency"] = img.getpixel((0, 0))       # a colour the image has: made white by PIL
    return {"420": _jpeg(img, quality=90), "422": _jpeg(img, subsampling=1), "444": _jpeg(img, subsampling=0),
            "progressive": _jpeg(img, progressive=True), "gray": _jpeg(img.convert("L")),
            "cmyk": _jpeg(img.convert("CMYK")), "png": image_bytes(img), "png-gray": image_bytes(img.convert("L")),
            "png-palette": image_bytes(make_image(53, 37, 11, "P")),
            "png-palette-4bit": image_bytes(img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), bits=4),
            "png-palette-1bit": image_bytes(img.convert("P", palette=Image.Palette.ADAPTIVE, colors=2), bits=1),
            "png-palette-trns": image_bytes(make_image(53, 37, 11, "P"), transparency=3),
            "png-rgba": image_bytes(make_image(53, 37, 11, "RGBA")),
            "png-la": image_bytes(make_image(53, 37, 11, "RGBA").convert("LA")),
            "png-opaque-rgba": image_bytes(make_image(53, 37, 11).convert("RGBA")),
            "png-trns": image_bytes(trns)}


# which fast decoder each case runs: simplejpeg, pyspng, or neither (decode_image: PIL). A PNG
# with tRNS has a plain header, so pyspng decodes it while the chunk walk finds the tRNS, and
# PIL's pixels are returned (the comparison below is what tells them apart)
FAST = {"420": "jpeg", "422": "jpeg", "444": "jpeg", "progressive": "jpeg", "gray": "jpeg", "cmyk": None,
        "png": "png", "png-gray": "png", "png-palette": "png", "png-palette-4bit": "png", "png-palette-1bit": "png",
        "png-palette-trns": "png", "png-rgba": "png", "png-la": "png", "png-opaque-rgba": "png", "png-trns": "png"}


def _count_fast_decodes(monkeypatch) -> list[str]:
    from qwen3vl_backend.processing import media

    calls = []
    if media.simplejpeg is not None:
        jpeg = media.simplejpeg.decode_jpeg
        monkeypatch.setattr(media.simplejpeg, "decode_jpeg", lambda *a, **k: calls.append("jpeg") or jpeg(*a, **k))
    if media.pyspng is not None:
        png = media.pyspng.load
        monkeypatch.setattr(media.pyspng, "load", lambda *a, **k: calls.append("png") or png(*a, **k))
    return calls


@pytest.mark.parametrize("case", list(FAST))
def test_decode_image_array_gives_decode_images_pixels(case, monkeypatch):
    """The array path (simplejpeg for YCbCr and grayscale JPEGs, pyspng for 8-bit RGB and
    grayscale PNGs without transparency) gives PIL's pixels bit for bit, and takes the fast
    decoder where it should: a planted fastupsample=True (libjpeg-turbo's cheaper chroma
    upsampling) fails the 4:2:0, 4:2:2 and progressive cases here; a PNG with tRNS let through
    to pyspng fails "png-trns" (PIL composites its transparent colour onto white)."""
    import numpy as np

    from qwen3vl_backend.processing import media

    data = _jpeg_cases()[case]
    calls = _count_fast_decodes(monkeypatch)
    ours = media.decode_image_array(data)
    ref = np.asarray(decode_image(data))
    assert ours.dtype == np.uint8 and ours.shape == ref.shape == (37, 53, 3) and ours.flags.writeable
    assert np.array_equal(ours, ref)
    fast = FAST[case]
    installed = {"jpeg": media.simplejpeg is not None, "png": media.pyspng is not None}
    assert calls == ([fast] if fast and installed[fast] else [])


def test_decode_image_array_refuses_what_decode_image_refuses(monkeypatch):
    """A JPEG or PNG header past the pixel limit is refused before any decoding; a truncated
    JPEG, and a PNG with a broken CRC or damaged image data, are refused with the same message as
    through PIL; a recoverable JPEG defect (bytes between segments) that PIL accepts is accepted
    with PIL's pixels, though simplejpeg's strict decoder refuses it."""
    import numpy as np

    from qwen3vl_backend.processing.media import decode_image_array

    data = _jpeg_cases()["420"]
    calls = _count_fast_decodes(monkeypatch)
    with pytest.raises(MediaError, match="53x37 pixels is larger than the 1000 pixel limit"):
        decode_image_array(data, max_pixels=1000)
    sof = data.index(b"\xff\xc0")       # baseline frame header: length, precision, height, width
    bomb = data[:sof + 5] + struct.pack(">HH", 30000, 30000) + data[sof + 9:]
    with pytest.raises(MediaError, match="30000x30000 pixels is larger than the 89478485 pixel limit"):
        decode_image_array(bomb)
    png = _jpeg_cases()["png"]              # an 8-bit RGB PNG's header past the limit, its CRC intact
    ihdr = png[8:33]
    big = ihdr[:8] + struct.pack(">II", 30000, 30000) + ihdr[16:21]
    big += struct.pack(">I", zlib.crc32(big[4:]))
    with pytest.raises(MediaError, match="30000x30000 pixels is larger than the 89478485 pixel limit"):
        decode_image_array(png[:8] + big + png[33:])
    assert calls == []                      # no bomb and not the small limit's image was decoded
    for at in (30, 50):                     # a CRC broken (IHDR's), a byte of the image data flipped
        damaged = bytearray(png)            # (libspng decodes both; the CRC walk beside it refuses them)
        damaged[at] ^= 0xFF
        with pytest.raises(MediaError, match="not a decodable image"):
            decode_image_array(bytes(damaged))
    for cut in (20, len(data) // 2):
        with pytest.raises(MediaError, match="not a decodable image"):
            decode_image_array(data[:cut])
    sos = data.index(b"\xff\xda")
    extraneous = data[:sos] + b"\x00\x00" + data[sos:]
    assert np.array_equal(decode_image_array(extraneous), np.asarray(decode_image(extraneous)))


def test_a_png_of_very_many_chunks_takes_pils_path():
    """The CRC walk beside pyspng is Python, a chunk at a time: past _PNG_MAX_CHUNKS (a body of
    tiny chunks is cheap to send) it stops and the PNG goes PIL's way, with the same pixels."""
    import numpy as np

    from qwen3vl_backend.processing import media

    png = _jpeg_cases()["png"]
    tiny = struct.pack(">I", 0) + b"prVt" + struct.pack(">I", zlib.crc32(b"prVt"))   # an ancillary chunk
    few = png[:33] + tiny * 10 + png[33:]
    many = png[:33] + tiny * (media._PNG_MAX_CHUNKS + 1) + png[33:]
    assert media._plain_png_chunks(few) and not media._plain_png_chunks(many)
    for data in (few, many):
        assert np.array_equal(media.decode_image_array(data), np.asarray(decode_image(png)))


def test_stored_png_is_the_same_image_with_its_stream_inflated(monkeypatch):
    """_stored_png (libdeflate inflates, pyspng only unfilters): for gray, RGB, gray + alpha and RGBA
    PNGs (their alpha composited onto white), one IDAT or many, with ancillary chunks, of one
    stored block or many (a tall image: more than 65,535 bytes of scanlines), the PNG it builds
    is valid (every CRC, IEND: _plain_png_chunks), its stream inflates through zlib (which checks
    the block lengths and the adler32) to the original's scanlines, and pyspng reads PIL's pixels
    from it. decode_image_array hands it to pyspng. A stream that does not inflate to the
    scanlines, scanlines past _STORED_MAX and an interlaced PNG give None (pyspng takes the
    original, and PIL refuses the damage). Planted and caught: NLEN not complemented, the
    final-block bit on every block, the IDAT's CRC over its length too, the path unused, the
    interlace check, the size limit off by one."""
    pytest.importorskip("deflate")
    import numpy as np

    from qwen3vl_backend.processing import media

    def ancillary(png):     # a gAMA and a tEXt chunk after IHDR (their CRCs intact)
        extra = b"".join(struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
                         for kind, body in ((b"gAMA", struct.pack(">I", 45455)), (b"tEXt", b"Comment\0hi")))
        return png[:33] + extra + png[33:]

    tall = make_image(3, 9000, 4)           # 9000 x (1 + 9) bytes: two stored blocks
    cases = {"rgb": image_bytes(make_image(53, 37, 11)), "gray": image_bytes(make_image(31, 7, 2).convert("L")),
             "tall": image_bytes(tall, compress_level=9), "ancillary": ancillary(image_bytes(make_image(40, 30, 5))),
             "idats": image_bytes(make_image(300, 200, 6), compress_level=0),   # PIL splits it into IDATs
             "rgba": image_bytes(make_image(29, 13, 7, "RGBA")),
             "la": image_bytes(make_image(29, 13, 7, "RGBA").convert("LA"))}
    assert cases["idats"].count(b"IDAT") > 1
    for name, png in cases.items():
        w, h = media._plain_png_header(png)
        stored = media._stored_png(png, w, h)
        assert stored is not None and media._plain_png_chunks(stored), name
        assert stored.count(b"IDAT") == 1 and b"gAMA" not in stored
        assert zlib.decompress(media.png_image_data(stored)) == zlib.decompress(media.png_image_data(png)), name
        want = np.asarray(decode_image(png))
        alpha = png[25] in (4, 6)
        got = media.pyspng.load(stored, "RGBA" if alpha else "RGB")
        got = media._on_white(got) if alpha else got
        assert np.array_equal(got, want), name
    assert len(zlib.decompress(media.png_image_data(cases["tall"]))) > media._STORED

    png = cases["rgb"]
    seen = []
    load = media.pyspng.load
    monkeypatch.setattr(media.pyspng, "load", lambda data, *a: seen.append(data) or load(data, *a))
    assert np.array_equal(media.decode_image_array(png), np.asarray(decode_image(png)))
    assert seen == [media._stored_png(png, 53, 37)]
    monkeypatch.undo()
    stream = media.png_image_data(png)
    start = png.index(stream[:16])
    bad_adler = bytearray(png)
    bad_adler[start + len(stream) - 1] ^= 1         # the stream's checksum (the chunk's CRC now off too)
    assert media._stored_png(bytes(bad_adler), 53, 37) is None
    assert media._stored_png(png, 53, 36) is None   # a stream longer than the scanlines
    monkeypatch.setattr(media, "_STORED_MAX", 37 * (1 + 53 * 3) - 1)     # one byte short of this image's
    assert media._stored_png(png, 53, 37) is None
    monkeypatch.undo()

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    # Adam7 (PIL writes none): 1x1, whose one pass has the plain stream's length, is left to pyspng
    interlaced = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 1))
                  + chunk(b"IDAT", zlib.compress(b"\x00\x10\x80\xf0")) + chunk(b"IEND", b""))
    assert media._stored_png(interlaced, 1, 1) is None
    assert np.array_equal(media.decode_image_array(interlaced), np.asarray(decode_image(interlaced)))
    with pytest.raises(MediaError, match="not a decodable image"):
        media.decode_image_array(bytes(bad_adler))
