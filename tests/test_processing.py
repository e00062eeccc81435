"""Input processing: message forms, media sources and the errors clients can cause."""

import base64
import json
import time

import numpy as np
import torch
import pytest

from conftest import data_uri, image_bytes, make_image
from qwen3vl_backend.processing.chat import RequestError, normalize_messages
from qwen3vl_backend.processing.media import MediaError, MediaPolicy, decode_image, fetch_bytes
from qwen3vl_backend.processing.processor import Processor
from qwen3vl_backend.processing.vision_inputs import smart_resize


def test_smart_resize_matches_reference():
    pytest.importorskip("oracle")        # defines the torchvision op schemas transformers needs
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as ref_image
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as ref_video

    sizes = [(1, 1), (20, 700), (200, 300), (257, 333), (720, 1280), (4000, 6000), (8191, 64)]
    for h, w in sizes:
        assert smart_resize(h, w, 32, 65536, 16777216) == ref_image(h, w, 32, 65536, 16777216)
        for t in (2, 5, 16):
            assert smart_resize(h, w, 32, 4096, 25165824, t, 2) == ref_video(t, h, w, 2, 32, 4096, 25165824)


@pytest.mark.parametrize("w,h", [(1280, 720), (1920, 1080), (100, 100), (3000, 40)])
def test_image_grid_is_the_grid_the_processor_makes(w, h):
    """--vit-warmup-sizes warms the grids requests' images become: the same as encoding one."""
    from PIL import Image

    from qwen3vl_backend.processing.vision_inputs import VisionProcessingConfig, image_grid, process_image

    cfg = VisionProcessingConfig()
    assert image_grid(w, h, cfg) == process_image(Image.new("RGB", (w, h)), cfg, repeat_frame=False)[1]


def test_image_sizes_parse_and_refuse():
    from qwen3vl_backend.processing.vision_inputs import parse_image_sizes

    assert parse_image_sizes("1280x720, 1920X1080") == [(1280, 720), (1920, 1080)]
    assert parse_image_sizes("none") == parse_image_sizes(" ") == []
    for bad in ("1280", "1280x", "x720", "0x5", "12.5x3", "1280x720,"):
        with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
            parse_image_sizes(bad)


def test_extreme_aspect_ratio_is_refused():
    with pytest.raises(RequestError, match="aspect ratio 250 exceeds 200"):
        smart_resize(10, 2500, 32, 65536, 16777216)


@pytest.mark.parametrize("messages,message", [
    ([], "'messages' must be a non-empty list"),
    ([{"content": "hi"}], "needs a 'role'"),
    ([{"role": "user", "content": 5}], "must be a string or a list of parts"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}],
     "unsupported content part type 'input_audio'"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "a image_url part needs a url"),
])
def test_malformed_messages_are_refused(messages, message):
    with pytest.raises(RequestError, match=message):
        normalize_messages(messages)


def test_media_part_options_are_kept():
    _, media = normalize_messages([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:x", "max_pixels": 4096}},
        {"type": "video_url", "video_url": {"url": "/v.mp4", "fps": 1, "max_frames": 8}}]}])
    assert [(m.kind, m.options) for m in media] == [("image", {"max_pixels": 4096}),
                                                    ("video", {"fps": 1, "max_frames": 8})]


def test_corrupt_base64_is_refused():
    with pytest.raises(MediaError, match="not valid base64"):
        fetch_bytes("data:image/png;base64,@@@not-base64@@@", MediaPolicy())


def test_bytes_that_are_not_an_image_are_refused():
    with pytest.raises(MediaError, match="not a decodable image"):
        decode_image(b"definitely not a png")


def test_local_files_need_a_file_url_under_the_allow_list(tmp_path):
    f = tmp_path / "a.png"
    f.write_bytes(image_bytes(make_image(40, 40, 1)))
    with pytest.raises(MediaError, match="local media \\(file:// URLs\\) is disabled"):
        fetch_bytes(f.as_uri(), MediaPolicy())
    with pytest.raises(MediaError, match="under the server's allowed local media path"):
        fetch_bytes(f.as_uri(), MediaPolicy(allowed_local_dir=str(tmp_path / "sub")))
    assert fetch_bytes(f.as_uri(), MediaPolicy(allowed_local_dir=str(tmp_path))) == f.read_bytes()
    with pytest.raises(MediaError, match="under the server's allowed local media path"):
        fetch_bytes("file://" + str(tmp_path / "sub" / ".." / ".." / "etc" / "passwd"),
                    MediaPolicy(allowed_local_dir=str(tmp_path / "sub")))
    with pytest.raises(MediaError, match="not valid base64"):           # a bare path is not a file reference
        fetch_bytes(str(f), MediaPolicy(allowed_local_dir=str(tmp_path)))
    with pytest.raises(MediaError, match="larger than the 10 byte limit"):
        fetch_bytes(f.as_uri(), MediaPolicy(allowed_local_dir=str(tmp_path), max_bytes=10))


def test_unreachable_url_is_refused():
    with pytest.raises(MediaError, match="could not fetch media from http://127.0.0.1:9/x.png"):
        fetch_bytes("http://127.0.0.1:9/x.png", MediaPolicy(fetch_timeout_s=2, allow_private=True))


def test_raw_base64_is_accepted():
    data = image_bytes(make_image(40, 30, 2))
    assert fetch_bytes(base64.b64encode(data).decode(), MediaPolicy()) == data


def test_palette_image_becomes_rgb():
    img = decode_image(image_bytes(make_image(40, 30, 2, "P")))
    assert img.mode == "RGB"


def test_per_request_max_pixels_shrinks_the_grid(tiny_dense):
    proc = Processor(tiny_dense)
    url = data_uri(image_bytes(make_image(640, 480, 1)))
    def grid(opts):
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url, **opts}}]}]
        return proc.process_messages(msgs).media[0].grid_thw
    assert grid({}) == (1, 30, 40)
    assert grid({"max_pixels": 256 * 256}) == (1, 12, 18)
    assert grid({"max_pixels": 1}) == (1, 2, 2)                        # a request may ask for less, down to one token
    assert grid({"min_pixels": 10**12, "max_pixels": 10**12}) == grid({})   # never for more than the server gives
    assert grid({"min_pixels": 2000 * 2000}) == grid({})
    with pytest.raises(RequestError, match="max_pixels must be a positive integer"):
        grid({"max_pixels": -1})


def test_image_pads_expanded_as_ids_equal_the_expanded_texts_tokens(tiny_dense):
    """build_prompt expands image pads in id space: the ids are those of tokenizing the expanded
    text, with text glued to the pads, two images in one part and images in two turns."""
    from qwen3vl_backend.processing.processor import MediaItem

    proc = Processor(tiny_dense)
    media = [MediaItem("image", None, grid, "h", 0) for grid in ((1, 4, 6), (1, 2, 2), (1, 6, 2))]
    text, _ = proc.render([{"role": "user", "content": [{"type": "text", "text": "ab"}, *[{"type": "image_url",
                           "image_url": {"url": "x"}}] * 2, {"type": "text", "text": "cd  e"}]},
                           {"role": "assistant", "content": "ok"},
                           {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "y"}}, {"type": "text", "text": "x"}]}])
    got = proc.build_prompt(text, media)
    assert got.prompt_ids == proc.tokenizer.encode(got.text)
    assert got.prompt_ids.count(proc.image_pad_id) == (24 + 4 + 12) // 4


def test_a_video_takes_the_templates_vision_pair_with_it(tiny_dense):
    """A video's frames each bring their own `<|vision_start|>...<|vision_end|>`, so the template's
    pair around its `<|video_pad|>` goes with it (Qwen's processor and transformers 5.25; 5.24 kept
    it around all the frames); a bare video pad (a raw prompt) is replaced alone, and an image's
    pair just before stays."""
    from qwen3vl_backend.processing.processor import VIDEO_PAD, VISION_END, VISION_START, MediaItem

    proc = Processor(tiny_dense)
    video = MediaItem("video", None, (2, 2, 4), "v", 4, timestamps=[0.5, 1.5])
    frames = "".join(f"<{t} seconds>{VISION_START}{VIDEO_PAD * 2}{VISION_END}" for t in (0.5, 1.5))
    assert proc._expand(f"a{VISION_START}{VIDEO_PAD}{VISION_END}b", [video]) == f"a{frames}b"
    assert proc._expand(f"a{VIDEO_PAD}b", [video]) == f"a{frames}b"
    assert proc._expand(f"{VISION_START}{VIDEO_PAD}b", [video]) == f"{VISION_START}{frames}b"   # not a pair
    image = MediaItem("image", None, (1, 2, 2), "i", 1)
    got = proc._expand(f"{VISION_START}<|image_pad|>{VISION_END}{VISION_START}{VIDEO_PAD}{VISION_END}.", [image, video])
    assert got == f"{VISION_START}<|image_pad|>{VISION_END}{frames}."
    ids = proc.build_prompt(f"x{VISION_START}{VIDEO_PAD}{VISION_END}y", [video]).prompt_ids
    assert ids.count(proc.tokenizer.encode(VISION_START)[0]) == 2 == ids.count(proc.tokenizer.encode(VISION_END)[0])


@pytest.mark.parametrize("h,w", [(64, 96), (704, 1280), (32, 320)])
def test_image_patchify_equals_the_repeated_frames(h, w):
    """The image path gathers the frame's patches once and repeats them over the temporal patch:
    bit for bit the general (video) patchify of the frame repeated."""
    import torch

    from qwen3vl_backend.processing.vision_inputs import VisionProcessingConfig, _patchify, _patchify_image

    cfg = VisionProcessingConfig()
    frame = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
    want = _patchify(frame[None].expand(cfg.temporal_patch_size, -1, -1, -1), cfg)
    got = _patchify_image(frame, cfg)
    assert got[1] == want[1] and torch.equal(got[0], want[0])
    assert torch.equal(_patchify_image(frame.permute(1, 2, 0).contiguous().permute(2, 0, 1), cfg)[0], want[0])


def test_content_hash_is_the_items_identity(tiny_dense):
    """The ViT and prefix caches key on it: the same bytes and options agree; other pixels, another
    grid or other frame options differ."""
    proc = Processor(tiny_dense)

    def item(img, **opts):
        url = data_uri(image_bytes(img))
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url, **opts}}]}]
        return proc.process_messages(msgs).media[0]

    a = make_image(640, 480, 1)
    same, again = item(a), item(a)
    assert same.content_hash == again.content_hash
    other = a.copy()
    other.putpixel((5, 5), (0, 0, 0) if a.getpixel((5, 5)) != (0, 0, 0) else (255, 255, 255))
    assert item(other).content_hash != same.content_hash
    smaller = item(a, max_pixels=256 * 256)
    assert smaller.grid_thw != same.grid_thw and smaller.content_hash != same.content_hash
    assert item(a, max_pixels=10**12).content_hash == same.content_hash        # the same grid: the same pixels


def test_video_content_hash_follows_the_frames_sampled(tiny_dense, video_file):
    proc = Processor(tiny_dense)

    def video(**opts):
        msgs = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video_file.as_uri(), **opts}}]}]
        return proc.process_messages(msgs).media[0]

    plain = video()
    assert video().content_hash == plain.content_hash
    assert video(fps=1).content_hash != plain.content_hash
    # five frames (the last repeated to fill the temporal patch) and six: other frames, the same grid
    five, six = video(max_frames=5), video(max_frames=6)
    assert five.grid_thw == six.grid_thw and five.content_hash != six.content_hash


def test_video_positions_advance_per_frame(tiny_dense, video_file):
    proc = Processor(tiny_dense)
    p = proc.process_messages([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video_file.as_uri()}}]}])
    [video] = p.media
    assert video.grid_thw[0] == 4 and len(video.timestamps) == 4
    assert p.text.count("seconds>") == 4
    assert p.positions.shape == (3, len(p.prompt_ids)) and p.rope_delta < 0


def test_per_request_fps_and_max_frames(tiny_dense, video_file):
    """The 4 s clip at 10 fps: 8 frames at the default 2 fps; fewer when the request asks."""
    proc = Processor(tiny_dense)

    def frames(**opts):
        msgs = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video_file.as_uri(), **opts}}]}]
        [video] = proc.process_messages(msgs).media
        return video.grid_thw[0] * 2, len(video.timestamps)

    assert frames() == (8, 4)
    assert frames(fps=1) == (4, 2)
    assert frames(max_frames=6) == (6, 3)
    assert frames(max_frames=100000) == frames()           # bounded: never more than fps and the server allow
    with pytest.raises(RequestError, match="fps must be a positive number"):
        frames(fps=0)


def test_stage_timing_reports_each_step_and_item(tiny_dense):
    """QWEN3VL_STAGE_TIMING's numbers: the preprocess steps and, per media item, fetch / decode /
    process, and the log line that carries them."""
    from qwen3vl_backend.serving.media_pool import MediaPool
    from qwen3vl_backend.serving.preprocess import Preprocessor
    from qwen3vl_backend.serving.stage_timing import stage_line

    pre = Preprocessor(Processor(tiny_dense), MediaPolicy(), MediaPool(2, 10))
    url = data_uri(image_bytes(make_image(64, 48, 3)))
    body = json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}] * 2}]})
    timing = {}
    arrays = pre.run(body, timing=timing)
    assert arrays["grid_thw"].shape == (2, 3)
    assert set(timing) == {"parse", "media", "finish", "items"} and len(timing["items"]) == 2
    for item in timing["items"]:
        assert set(item) == {"fetch", "decode", "process"} and all(v >= 0 for v in item.values())
    assert timing["media"] >= max(item["decode"] for item in timing["items"])
    line = stage_line(timing, time.monotonic() - 0.5)
    assert line.startswith("parse=") and line.count("[fetch=") == 2 and float(line.split("total=")[1]) >= 500
    # the vit's line names each replica's GPU and path as they are
    assert stage_line({"queue": 4.5, "paths": "0:first,1:replay"}) == "queue=4.5 paths=0:first,1:replay"


def test_media_input_entries_stand_in_for_the_parts_urls(tiny_dense):
    """A JSON text_input's media parts may name the `media` input's entries ("media-input:N", the
    OpenAI adapter's way of keeping data URIs out of the JSON): the same arrays as the URIs
    inline; a name past the entries, an entry no part names, and media with a plain prompt are
    the client's mistakes."""
    from qwen3vl_backend.errors import RequestError as Refused
    from qwen3vl_backend.serving.media_pool import MediaPool
    from qwen3vl_backend.serving.preprocess import Preprocessor

    pre = Preprocessor(Processor(tiny_dense), MediaPolicy(), MediaPool(2, 10))
    urls = [data_uri(image_bytes(make_image(64, 48, s))) for s in (1, 2)]

    def chat(a, b):
        return json.dumps({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": a, "max_pixels": 32 * 32}}, {"type": "text", "text": "and"},
            {"type": "image_url", "image_url": {"url": b}}]}]})

    inline = pre.run(chat(*urls))
    named = pre.run(chat("media-input:1", "media-input:0"), media=urls[::-1])
    assert set(named) == set(inline)
    for k in inline:
        assert np.array_equal(named[k], inline[k]), k
    assert inline["grid_thw"].tolist()[0] != inline["grid_thw"].tolist()[1]       # max_pixels kept
    for text, media, message in ((chat("media-input:0", "media-input:2"), urls, "names no entry"),
                                 (chat("media-input:0", "media-input:x"), urls, "names no entry"),
                                 (chat("media-input:0", "media-input:\u00b2"), urls, "names no entry"),
                                 (chat("media-input:0", "media-input:0"), urls, r"entries \[1\] are named by no"),
                                 ("describe", urls[:1], "plain prompt")):
        with pytest.raises(Refused, match=message):
            pre.run(text, media=media)


def test_request_profiler_writes_the_chosen_requests_tables(tmp_path):
    """QWEN3VL_STAGE_PROFILE's profiler: requests first .. first + count - 1 get a table each,
    named by their order and id, with the operators run inside; the others run unprofiled."""
    import torch

    from qwen3vl_backend.serving.stage_timing import RequestProfiler

    prof = RequestProfiler(str(tmp_path / "p"), "vit", first=2, count=2)
    for i in range(4):
        with prof(f"req/{i}"):
            torch.ones(8, 8) @ torch.ones(8, 8)
    files = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert files == ["vit-2-req1.txt", "vit-3-req2.txt"]
    assert "aten::mm" in (tmp_path / "p" / files[0]).read_text()
    off = RequestProfiler(None, "vit")
    with off("x"):
        pass
    assert off.seen == 1
    picked = RequestProfiler(str(tmp_path / "q"), "vit", at="1,4")      # QWEN3VL_STAGE_PROFILE_AT
    for i in range(4):
        with picked(f"r{i}"):
            torch.ones(2)
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["vit-1-r0.txt", "vit-4-r3.txt"]


def test_images_travel_as_single_frames(tiny_dense, video_file):
    """An images-only request's pixel rows hold each frame once (half the bytes from preprocess to
    the vit); repeated over the temporal patch (expand_image_rows, normalised or not) they are the
    processor's full patch rows, bit for bit. With a video in the request every row is a full patch."""
    import torch

    from qwen3vl_backend.processing.vision_inputs import expand_image_rows, normalize_patches
    from qwen3vl_backend.serving.media_pool import MediaPool
    from qwen3vl_backend.serving.preprocess import Preprocessor

    proc = Processor(tiny_dense)
    cfg = proc.cfg
    pre = Preprocessor(proc, MediaPolicy(), MediaPool(2, 10))
    urls = [data_uri(image_bytes(make_image(w, h, s))) for s, (w, h) in enumerate([(64, 48), (40, 72)])]
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    arrays = pre.run(json.dumps({"messages": [{"role": "user", "content": parts}]}))
    single = torch.from_numpy(arrays["pixel_values"])
    full = torch.cat([m.pixel_values for m in proc.process_messages(
        [{"role": "user", "content": parts}], normalize=False).media])
    assert single.shape == (full.shape[0], cfg.patch_width // cfg.temporal_patch_size)
    # a full row is (channel, temporal step, patch pixels): each channel's frame run Tp times over
    c, tp = len(cfg.image_mean), cfg.temporal_patch_size
    by_channel = single.reshape(single.shape[0], c, -1)
    assert torch.equal(torch.stack([by_channel] * tp, dim=2).reshape(single.shape[0], -1), full)
    assert torch.equal(expand_image_rows(single, cfg), full)
    assert torch.equal(expand_image_rows(normalize_patches(single, cfg), cfg), normalize_patches(full, cfg))
    # one image: its rows leave as they are (no join), the same bytes
    one = pre.run(json.dumps({"messages": [{"role": "user", "content": parts[:1]}]}))["pixel_values"]
    first = proc.process_messages([{"role": "user", "content": parts[:1]}], normalize=False).media[0].pixel_values
    assert torch.equal(expand_image_rows(torch.from_numpy(one), cfg), first)
    pytest.importorskip("av", reason="the video fixture is written with PyAV")
    mixed = pre.run(json.dumps({"messages": [{"role": "user", "content": parts[:1] + [
        {"type": "video_url", "video_url": {"url": data_uri(video_file.read_bytes(), "video/mp4")}}]}]}))
    assert mixed["pixel_values"].shape[1] == cfg.patch_width


RESIZE_SHAPES = [(720, 1280, 704, 1280), (1080, 1920, 1088, 1920), (200, 300, 224, 320), (257, 333, 256, 320),
                 (64, 64, 224, 224), (3024, 4032, 704, 928), (50, 1000, 64, 512), (999, 31, 1024, 32), (1, 1, 32, 32),
                 (4000, 3000, 32, 32), (2, 5000, 32, 64), (31, 33, 32, 32), (480, 640, 480, 640)]


@pytest.mark.parametrize("height,width,out_h,out_w", RESIZE_SHAPES)
def test_integer_resize_is_torchs_uint8_resize_bit_for_bit(height, width, out_h, out_w):
    """processing.resize (the vit's resize on a GPU) against F.interpolate's uint8 antialiased
    bicubic on the CPU, which the processor runs: up and down, one axis or both, extreme ratios,
    one-pixel images; noise, flat black and white, and a checkerboard (every clamp taken)."""
    import torch.nn.functional as F

    from qwen3vl_backend.processing.resize import resize_uint8

    g = torch.Generator().manual_seed(height * 7919 + width)
    noise = torch.randint(0, 256, (1, 3, height, width), dtype=torch.uint8, generator=g)
    checker = ((torch.arange(height)[:, None] + torch.arange(width)[None, :]) % 2 * 255).to(torch.uint8)
    for frames in (noise, torch.zeros_like(noise), torch.full_like(noise, 255), checker.expand(1, 3, -1, -1)):
        want = F.interpolate(frames, size=(out_h, out_w), mode="bicubic", antialias=True)
        assert torch.equal(resize_uint8(frames, out_h, out_w), want)


def test_integer_resize_tap_by_tap_is_the_same(monkeypatch):
    """Past GATHER_ELEMENTS the taps are taken one at a time: the same values."""
    import torch.nn.functional as F

    from qwen3vl_backend.processing import resize

    monkeypatch.setattr(resize, "GATHER_ELEMENTS", 0)
    frames = torch.randint(0, 256, (1, 3, 301, 203), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    for out_h, out_w in ((224, 160), (608, 416), (301, 96)):
        want = F.interpolate(frames, size=(out_h, out_w), mode="bicubic", antialias=True)
        assert torch.equal(resize.resize_uint8(frames, out_h, out_w), want)


def test_images_sent_unresized_make_the_hosts_rows(tiny_dense):
    """raw_frames: an images-only request's images leave preprocess unresized, their pixels and
    (H, W) in source_sizes; raw_frames_to_rows (the vit's side) makes of them the rows the host
    path sends, bit for bit, on the CPU (the host's resize) and with processing.resize's integer
    ops (what runs on a GPU). An image far past max_pixels is resized on the host, and a request
    with one such image sends every image resized."""
    from unittest import mock

    from qwen3vl_backend.processing import vision_inputs
    from qwen3vl_backend.processing.resize import resize_uint8
    from qwen3vl_backend.processing.vision_inputs import raw_frames_to_rows
    from qwen3vl_backend.serving.media_pool import MediaPool
    from qwen3vl_backend.serving.preprocess import Preprocessor

    proc = Processor(tiny_dense)
    cfg = proc.cfg
    host = Preprocessor(proc, MediaPolicy(), MediaPool(2, 10))
    raw = Preprocessor(proc, MediaPolicy(), MediaPool(2, 10), raw_frames=True)
    sizes = [(64, 48), (40, 72), (333, 257)]
    parts = [{"type": "image_url", "image_url": {"url": data_uri(image_bytes(make_image(w, h, s)))}}
             for s, (w, h) in enumerate(sizes)]
    body = json.dumps({"messages": [{"role": "user", "content": parts}]})
    want, got = host.run(body), raw.run(body)
    assert want["source_sizes"].shape == (0, 2)
    assert got["source_sizes"].tolist() == [[h, w] for w, h in sizes]
    assert got["pixel_values"].shape == (sum(w * h for w, h in sizes), 3)
    for k in ("input_ids", "positions", "grid_thw", "media_hashes"):
        assert np.array_equal(got[k], want[k]), k
    rows = raw_frames_to_rows(torch.from_numpy(got["pixel_values"]), got["source_sizes"], got["grid_thw"], cfg)
    assert torch.equal(rows, torch.from_numpy(want["pixel_values"]))
    # the integer resize in place of the host's, as a GPU runs it
    with mock.patch.object(vision_inputs, "_resize", resize_uint8):
        rows = raw_frames_to_rows(torch.from_numpy(got["pixel_values"]), got["source_sizes"], got["grid_thw"], cfg)
    assert torch.equal(rows, torch.from_numpy(want["pixel_values"]))
    # past RAW_FRAME_MAX_RATIO x its resized pixels: this image, and so the whole request, resized here
    big = {"type": "image_url", "image_url": {"url": data_uri(image_bytes(make_image(400, 300, 9))),
                                              "max_pixels": 64 * 64}}
    body = json.dumps({"messages": [{"role": "user", "content": [parts[0], big]}]})
    mixed, host_mixed = raw.run(body), host.run(body)
    assert mixed["source_sizes"].shape == (0, 2)
    assert np.array_equal(mixed["pixel_values"], host_mixed["pixel_values"])


def test_the_vit_checks_unresized_images(tiny_dense):
    """What raw_frames_to_rows refuses as the caller's mistake (the vit answers 400): sizes that do
    not describe the pixels or the grids, and grids an unresized image cannot have, among them one
    past the server's max_pixels (a 1x1 image must not buy a ViT pass of the largest size), and a
    frame too large for its grid on any side (what the width-first resize would hold)."""
    from qwen3vl_backend.processing.vision_inputs import raw_frames_to_rows

    cfg = Processor(tiny_dense).cfg
    px = torch.zeros(6 * 5 + 2 * 2, 3, dtype=torch.uint8)
    assert raw_frames_to_rows(px, [(6, 5), (2, 2)], [(1, 4, 6), (1, 2, 2)], cfg).shape == (24 + 4, cfg.patch_width // 2)
    side = int((cfg.image_max_pixels // cfg.patch_size ** 2) ** 0.5) // 2 * 2 + 2
    tall = 4 * 2 * cfg.patch_size + 1
    for pixels, sizes, grids, message in (
            (px, [(6, 5)], [(1, 4, 6), (1, 2, 2)], "1 rows for 2 grids"),
            (px, [(6, 5), (2, 3)], [(1, 4, 6), (1, 2, 2)], "describe 36"),
            (px, [(6, 5), (0, 4)], [(1, 4, 6), (1, 2, 2)], "each side positive"),
            (px, [(6, 5), (2, 2)], [(2, 4, 6), (1, 2, 2)], r"grid is \(1, h, w\)"),
            (px, [(6, 5), (2, 2)], [(1, 3, 6), (1, 2, 2)], "multiples"),
            (px, [(6, 5), (2, 2)], [(1, side, side), (1, 2, 2)], "max_pixels|pixels an image"),
            (px.view(-1), [(6, 5), (2, 2)], [(1, 4, 6), (1, 2, 2)], r"\(pixels, 3\)"),
            # few pixels, but a side past 4x its resize's: the width pass would hold tall x 2 patches
            (torch.zeros(tall, 3, dtype=torch.uint8), [(tall, 1)], [(1, 2, 2)], "its grid")):
        with pytest.raises(ValueError, match=message):
            raw_frames_to_rows(pixels, sizes, grids, cfg)


def test_the_vit_checks_its_pixel_rows(tiny_dense):
    """What the vit model refuses as the caller's mistake (a 400): rows that do not match the
    grids, a row width that is neither a patch nor (images only) one frame, grids it cannot use."""
    from qwen3vl_backend.processing.vision_inputs import check_pixel_rows

    cfg = Processor(tiny_dense).cfg
    width, frame = cfg.patch_width, cfg.patch_width // cfg.temporal_patch_size
    check_pixel_rows((4 * 6 + 2 * 4 * 4, width), [(1, 4, 6), (2, 4, 4)], cfg)
    check_pixel_rows((4 * 6 + 4 * 4, frame), [(1, 4, 6), (1, 4, 4)], cfg)
    check_pixel_rows((0, width), [], cfg)
    for shape, grids, message in (((25, width), [(1, 4, 6)], "has 25 rows"),
                                  ((24 + 32, frame), [(1, 4, 6), (2, 4, 4)], "rows of"),
                                  ((24, width + 1), [(1, 4, 6)], "rows of"),
                                  ((24, width, 1), [(1, 4, 6)], "2-D"),
                                  ((24, width), [(1, 3, 8)], "multiples"),
                                  ((0, width), [(0, 4, 4)], "positive")):
        with pytest.raises(ValueError, match=message):
            check_pixel_rows(shape, grids, cfg)


@pytest.mark.parametrize("frames,height,width,out_h", [(1, 720, 1280, 704), (1, 1080, 1920, 1088), (3, 721, 1283, 736),
                                                        (2, 600, 1024, 512)])
def test_resize_in_vertical_strips_is_one_resize_bit_for_bit(frames, height, width, out_h, monkeypatch):
    """A resize that keeps the width runs as RESIZE_STRIPS vertical strips on threads: the same
    bytes as one call, contiguous, for images and video frames, at widths the strips do not divide;
    a resize that changes the width, or a small one, is one call. A planted strip one column
    short (that column never resized) fails the comparison."""
    import torch
    import torch.nn.functional as F

    from qwen3vl_backend.processing import vision_inputs as vi

    g = torch.Generator().manual_seed(height)
    x = torch.randint(0, 256, (frames, height, width, 3), generator=g, dtype=torch.uint8).permute(0, 3, 1, 2)
    monkeypatch.setattr(vi, "RESIZE_STRIPS", 4)         # (hosts of fewer than 8 cores default to 1)
    calls = []
    real = F.interpolate
    monkeypatch.setattr(vi.F, "interpolate", lambda t, **kw: calls.append(t.shape[-1]) or real(t, **kw))
    want = real(x, size=(out_h, width), mode="bicubic", antialias=True)
    got = vi._resize(x, out_h, width)
    assert torch.equal(got, want) and got.is_contiguous()      # (one call's layout follows its input's)
    assert sorted(calls) == sorted(width * (i + 1) // 4 - width * i // 4 for i in range(4))
    calls.clear()
    assert torch.equal(vi._resize(x, out_h, width - 32), real(x, size=(out_h, width - 32), mode="bicubic", antialias=True))
    small = x[..., :64, :64]
    assert torch.equal(vi._resize(small, 32, 64), real(small, size=(32, 64), mode="bicubic", antialias=True))
    assert calls == [width, 64]
