"""Qwen3-VL image and video processing, identical to transformers' processors.

Images: `smart_resize` to multiples of patch*merge (32) within [min_pixels, max_pixels],
bicubic with antialias on the uint8 tensor (what torchvision does on CPU), patchify in
merge-block order with the frame repeated over the temporal patch, normalise with mean/std 0.5
(`normalize_patches`, separate so that pixels can travel as uint8). Videos: sample at `fps` within [min_frames, max_frames], the same resize for all frames
(pixel budget over t*h*w; with `cap_pixels_per_frame`, as transformers >= 5.18 offers, each
frame also at most `max_video_tokens` merged patches), pad the frame count to the temporal
patch, and timestamp each temporal patch with the mean time of its frames.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .chat import RequestError
from .jpeg_gpu import decode_frame
from .resize import resize_uint8

DATA = Path(__file__).resolve().parent.parent / "data"


@dataclass(frozen=True)
class VisionProcessingConfig:
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_min_pixels: int = 65536
    image_max_pixels: int = 16777216
    video_min_pixels: int = 4096
    video_max_pixels: int = 25165824
    video_fps: float = 2.0
    video_min_frames: int = 4
    video_max_frames: int = 768
    # transformers' per-frame pixel cap (qwen-vl-utils' behaviour); its default is still off in 5.25
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 768

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def patch_width(self) -> int:
        """Values per patch: channels x temporal patch x patch x patch (1536 for Qwen3-VL)."""
        return len(self.image_mean) * self.temporal_patch_size * self.patch_size ** 2

    @classmethod
    def from_dir(cls, model_dir: str | Path | None) -> "VisionProcessingConfig":
        def read(name):
            for d in ([Path(model_dir)] if model_dir else []) + [DATA]:
                if (d / name).exists():
                    return json.loads((d / name).read_text())
            return {}

        img, vid = read("preprocessor_config.json"), read("video_preprocessor_config.json")
        base = cls()
        return cls(
            patch_size=img.get("patch_size", base.patch_size),
            temporal_patch_size=img.get("temporal_patch_size", base.temporal_patch_size),
            merge_size=img.get("merge_size", base.merge_size),
            image_mean=tuple(img.get("image_mean", base.image_mean)),
            image_std=tuple(img.get("image_std", base.image_std)),
            image_min_pixels=img.get("size", {}).get("shortest_edge", img.get("min_pixels", base.image_min_pixels)),
            image_max_pixels=img.get("size", {}).get("longest_edge", img.get("max_pixels", base.image_max_pixels)),
            video_min_pixels=vid.get("size", {}).get("shortest_edge", base.video_min_pixels),
            video_max_pixels=vid.get("size", {}).get("longest_edge", base.video_max_pixels),
            video_fps=vid.get("fps", base.video_fps),
            video_min_frames=vid.get("min_frames", base.video_min_frames),
            video_max_frames=vid.get("max_frames", base.video_max_frames),
            cap_pixels_per_frame=bool(vid.get("cap_pixels_per_frame") or base.cap_pixels_per_frame),
            max_video_tokens=vid.get("max_video_tokens", base.max_video_tokens),
        )


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int,
                 num_frames: int = 1, temporal_factor: int = 1) -> tuple[int, int]:
    """Target (h, w): multiples of `factor`, t*h*w within the pixel budget, aspect kept."""
    if temporal_factor > 1 and (height < factor or width < factor):   # video frames only, as the reference
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise RequestError(f"aspect ratio {max(height, width) / min(height, width):.0f} exceeds 200")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_size_for(height: int, width: int, cfg: VisionProcessingConfig, min_pixels: int | None = None,
                   max_pixels: int | None = None) -> tuple[int, int]:
    """An image's resized (height, width): smart_resize within the server's or the request's bounds."""
    return smart_resize(height, width, cfg.factor, min_pixels or cfg.image_min_pixels,
                        max_pixels or cfg.image_max_pixels)


def image_grid(width: int, height: int, cfg: "VisionProcessingConfig") -> tuple[int, int, int]:
    """The (t, h, w) patch grid a width x height image becomes, as `process_image` resizes it."""
    h, w = image_size_for(height, width, cfg)
    return 1, h // cfg.patch_size, w // cfg.patch_size


def parse_image_sizes(text: str) -> list[tuple[int, int]]:
    """"1280x720,1920x1080" -> [(1280, 720), (1920, 1080)] (width x height); "" or "none" -> []."""
    if text.strip().lower() in ("", "none"):
        return []
    sizes = []
    for part in text.split(","):
        w, sep, h = part.strip().lower().partition("x")
        if not (sep and w.isdigit() and h.isdigit() and int(w) > 0 and int(h) > 0):
            raise ValueError(f"image size {part.strip()!r}: WIDTHxHEIGHT in pixels, e.g. 1280x720")
        sizes.append((int(w), int(h)))
    return sizes


# A resize that keeps the width (1280x720 -> 1280x704, 1920x1080 -> 1920x1088: the common photo
# and screen sizes) only filters along columns, so vertical strips of the frame resize apart, bit
# for bit the same, on these threads: torch's uint8 antialiased resize runs on one thread (1280x720:
# ~2-4 ms here). The threads are shared by all requests, one a core, so a busy server resizes as
# many strips at once as it resized whole frames before; on a host of fewer than 8 cores, one call
# (threads there only contend: benchmarks.preprocess).
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
RESIZE_STRIPS = 4 if _CORES >= 8 else 1
RESIZE_MIN_PIXELS = 1 << 19          # smaller frames: one call
_strips = ThreadPoolExecutor(max_workers=max(4, _CORES), thread_name_prefix="resize")


def _resize(frames: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """frames (B, 3, H, W) uint8 -> (B, 3, h, w) uint8, bicubic with antialias."""
    if frames.shape[-2:] == (h, w):
        return frames
    width = frames.shape[-1]
    if w != width or h * w < RESIZE_MIN_PIXELS or RESIZE_STRIPS < 2:
        return F.interpolate(frames, size=(h, w), mode="bicubic", antialias=True)
    edges = [width * i // RESIZE_STRIPS for i in range(RESIZE_STRIPS + 1)]

    def strip(i: int) -> torch.Tensor:
        # channels-last in (torch's fast uint8 path); contiguous out (one call's layout follows
        # its input's strides; the patch rows are made faster from this one)
        part = frames[..., edges[i]:edges[i + 1]].contiguous(memory_format=torch.channels_last)
        return F.interpolate(part, size=(h, part.shape[-1]), mode="bicubic", antialias=True).contiguous()
    return torch.cat(list(_strips.map(strip, range(RESIZE_STRIPS))), -1)


def normalize_patches(patches: torch.Tensor, cfg: VisionProcessingConfig) -> torch.Tensor:
    """uint8 patches (N, C*Tp*P*P) -> float32, (x - 255 mean) / (255 std) per channel.

    The same float32 arithmetic as normalising whole frames, so the values are bitwise equal;
    done after patchify, the pixels can travel as uint8 (a quarter of the bytes) and be
    normalised where the ViT runs.
    """
    c = len(cfg.image_mean)
    mean = torch.tensor(cfg.image_mean, device=patches.device).view(1, c, 1) * 255.0
    std = torch.tensor(cfg.image_std, device=patches.device).view(1, c, 1) * 255.0
    x = patches.float().view(patches.shape[0], c, -1)
    return ((x - mean) / std).view(patches.shape[0], -1)


def _patchify(frames: torch.Tensor, cfg: VisionProcessingConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """frames (T, C, h, w) with T a multiple of the temporal patch -> (gt*gh*gw, C*Tp*P*P)."""
    t, c, h, w = frames.shape
    p, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gt, gh, gw = t // tp, h // p, w // p
    x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)            # gt, bh, bw, mh, mw, c, tp, p, p
    return x.reshape(gt * gh * gw, c * tp * p * p), (gt, gh, gw)


def _patchify_image(frame: torch.Tensor, cfg: VisionProcessingConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """One frame (C, h, w) repeated over the temporal patch -> what _patchify gives for it, bit for
    bit: the frame's patches are gathered once, then each (channel, patch) run of P*P bytes is
    written Tp times side by side (2.5x faster than permuting the repeated frame, one thread)."""
    c, h, w = frame.shape
    gh, gw = h // cfg.patch_size, w // cfg.patch_size
    return expand_image_rows(_frame_rows(frame, cfg), cfg), (1, gh, gw)


def _frame_rows(frame: torch.Tensor, cfg: VisionProcessingConfig) -> torch.Tensor:
    """One frame (C, h, w) -> its patches' rows (gh*gw, C*P*P) in merge-block order, each once."""
    c, h, w = frame.shape
    p, m = cfg.patch_size, cfg.merge_size
    gh, gw = h // p, w // p
    single = frame.reshape(c, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)   # bh, bw, mh, mw, c, p, p
    return single.reshape(gh * gw, c * p * p)


# an image travels unresized (Processor.load_media's raw_frame) when its frame has at most this
# many times its resized pixels, and each side at most this many times its resized side: a photo
# far past max_pixels is resized on the host rather than sent whole, and the vit, which resizes
# the width first, never holds more than this many times a resized frame
RAW_FRAME_MAX_RATIO = 4


def raw_frame_fits(height: int, width: int, h: int, w: int) -> bool:
    """Whether a height x width frame may travel unresized to its h x w resize (RAW_FRAME_MAX_RATIO)."""
    r = RAW_FRAME_MAX_RATIO
    return height * width <= r * h * w and height <= r * h and width <= r * w


def _uint8_array(image) -> np.ndarray:
    """A decoded image, PIL or uint8 array, as a writable uint8 array (torch.from_numpy's): the
    decoder's own array where it is one, else a copy."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.flags.writeable:
        return image
    return np.asarray(image, dtype=np.uint8).copy()


def frame_pixels(image) -> torch.Tensor:
    """A decoded image, PIL or (H, W, 3) uint8 array -> its pixels (H*W, 3) uint8, row-major:
    what the vit model resizes itself (raw_frame_rows) when preprocess sends frames unresized."""
    image = _uint8_array(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"an RGB frame (H, W, 3), not {image.shape}")
    return torch.from_numpy(image).view(-1, 3)


def raw_frame_rows(pixels: torch.Tensor, source: tuple[int, int], grid: tuple[int, int, int],
                   cfg: VisionProcessingConfig) -> torch.Tensor:
    """One image's pixels (H*W, 3) uint8 as `frame_pixels` gives them, on any device -> its rows
    (gh*gw, C*P*P) in merge-block order, as process_image(repeat_frame=False) makes them on the
    host: the same resize (resize.resize_uint8 off the CPU: the CPU's values bit for bit)."""
    height, width = source
    frame = pixels.view(height, width, 3).permute(2, 0, 1)[None]
    h, w = grid[1] * cfg.patch_size, grid[2] * cfg.patch_size
    frame = _resize(frame, h, w) if frame.device.type == "cpu" else resize_uint8(frame, h, w)
    return _frame_rows(frame[0], cfg)


def process_image(image, cfg: VisionProcessingConfig, min_pixels: int | None = None,
                  max_pixels: int | None = None, repeat_frame: bool = True) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """PIL RGB image, or its (H, W, 3) uint8 array -> uint8 patches (gh*gw, 1536) and its grid
    (1, gh, gw); see normalize_patches. One image fills the temporal patch (the frame repeated).
    `repeat_frame=False`: the frame's rows once, (gh*gw, 768), half the bytes to move;
    `expand_image_rows` repeats them."""
    arr = torch.from_numpy(_uint8_array(image)).permute(2, 0, 1)[None]
    h, w = image_size_for(arr.shape[2], arr.shape[3], cfg, min_pixels, max_pixels)
    frame = _resize(arr, h, w)[0]
    if not repeat_frame:
        return _frame_rows(frame, cfg), (1, h // cfg.patch_size, w // cfg.patch_size)
    return _patchify_image(frame, cfg)


def check_pixel_rows(shape: tuple[int, ...], grids, cfg: VisionProcessingConfig) -> None:
    """What the vit model takes, as preprocess sends it: one row per patch of every item's grid
    (t, h, w), each row a full patch (patch_width) or, when every item is one image (t == 1), its
    frame once (expand_image_rows). ValueError (the caller's mistake) otherwise."""
    m = cfg.merge_size
    if len(shape) != 2:
        raise ValueError(f"pixel_values must be 2-D (patches, values), not {len(shape)}-D")
    for g in grids:
        if len(g) != 3 or min(g) < 1 or g[1] % m or g[2] % m:
            raise ValueError(f"grid_thw {tuple(int(x) for x in g)}: each of t, h, w positive, h and w multiples of {m}")
    rows = sum(int(t) * int(h) * int(w) for t, h, w in grids)
    if shape[0] != rows:
        raise ValueError(f"pixel_values has {shape[0]} rows; grid_thw's items have {rows} patches")
    single = cfg.patch_width // cfg.temporal_patch_size
    if shape[1] == cfg.patch_width or (shape[1] == single and all(int(g[0]) == 1 for g in grids)):
        return
    raise ValueError(f"pixel_values rows of {shape[1]} values: a patch is {cfg.patch_width} (or {single}, one "
                     "frame of images only)")


def raw_frames_to_rows(pixels: torch.Tensor, sizes, grids, cfg: VisionProcessingConfig,
                       device: torch.device | None = None, encoded: tuple | None = None,
                       checks: list | None = None, gpu_decode: bool = True) -> torch.Tensor:
    """What the vit model takes when preprocess sends images unresized: their pixels (sum H*W, 3)
    uint8, each image's (H, W) in `sizes` and its grid (1, gh, gw) -> the single-frame rows
    (sum gh*gw, C*P*P) that check_pixel_rows admits, on `device` (one copy there first). ValueError
    (the caller's mistake) for sizes or grids that do not describe the pixels, a grid past the
    server's max_pixels (its patches would cost the ViT what the bytes sent do not), or a frame
    past raw_frame_fits (a 4000 x 1 frame for a 32 x 4096 grid would be 4000 x 4096 after its
    width pass). `encoded`: (the JPEGs' bytes (B,) uint8, each item's byte count (M,)): an item
    with a count came as a JPEG (media.gpu_jpeg_size), decoded here (jpeg_gpu.decode_frame: by
    nvJPEG on a GPU), and has no pixels in `pixels`; ValueError for counts that do not add up
    to the bytes, or a JPEG that is not of its source size or does not decode. `checks`: as
    decode_frame's, each pending check appended with its item's index, (i, Future); where one
    says False, the rows are made again with `gpu_decode` False: every JPEG decoded by the host
    (an intact one to nvJPEG's pixels, a damaged one to the host's own)."""
    if len(sizes) != len(grids):
        raise ValueError(f"source_sizes has {len(sizes)} rows for {len(grids)} grids")
    lengths = [0] * len(sizes)
    if encoded is not None and len(encoded[1]):
        data, lengths = encoded[0], [int(n) for n in encoded[1]]
        if len(lengths) != len(sizes) or min(lengths) < 0 or sum(lengths) != len(data):
            raise ValueError(f"jpeg_lengths {lengths[:8]} do not describe {len(data)} bytes of JPEGs for "
                             f"{len(sizes)} images")
        data = bytes(data.cpu().numpy() if isinstance(data, torch.Tensor) else memoryview(data))
    if pixels.dim() != 2 or pixels.shape[1] != 3:
        raise ValueError(f"unresized pixels come as (pixels, 3), not {tuple(pixels.shape)}")
    m, p = cfg.merge_size, cfg.patch_size
    total, checked = 0, []
    for i, ((height, width), g) in enumerate(zip(sizes, grids)):
        if len(g) != 3 or int(g[0]) != 1 or min(g) < 1 or g[1] % m or g[2] % m:
            raise ValueError(f"grid_thw {tuple(int(x) for x in g)}: an unresized image's grid is (1, h, w), "
                             f"h and w positive multiples of {m}")
        if int(g[1]) * int(g[2]) * p * p > cfg.image_max_pixels:
            raise ValueError(f"grid_thw {tuple(int(x) for x in g)}: past the server's {cfg.image_max_pixels} "
                             "pixels an image")
        if min(height, width) < 1:
            raise ValueError(f"source size {(int(height), int(width))}: each side positive")
        if not raw_frame_fits(int(height), int(width), int(g[1]) * p, int(g[2]) * p):
            raise ValueError(f"source size {(int(height), int(width))}: more than {RAW_FRAME_MAX_RATIO}x its grid "
                             f"{tuple(int(x) for x in g)}'s pixels or sides (resize it first)")
        total += 0 if lengths[i] else int(height) * int(width)
        checked.append((int(height), int(width)))
    if total != pixels.shape[0]:
        raise ValueError(f"pixel_values has {pixels.shape[0]} pixels; source_sizes describe {total}")
    pixels = pixels.to(device) if device is not None else pixels
    rows, start, at = [], 0, 0
    for (height, width), g, length in zip(checked, grids, lengths):
        if length:
            pending = [] if checks is not None else None
            frame = decode_frame(data[at:at + length], height, width, device or pixels.device, pending, gpu_decode)
            if pending:
                checks.extend((len(rows), c) for c in pending)
            at += length
        else:
            frame = pixels[start:start + height * width]
            start += height * width
        rows.append(raw_frame_rows(frame, (height, width), tuple(int(x) for x in g), cfg))
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def expand_image_rows(rows: torch.Tensor, cfg: VisionProcessingConfig) -> torch.Tensor:
    """Images' single-frame rows (N, C*P*P), raw or normalised, any device -> the full patch rows
    (N, C*Tp*P*P) that process_image gives, bit for bit: each (channel, patch) run repeated over
    the temporal patch."""
    c, tp, pp = len(cfg.image_mean), cfg.temporal_patch_size, cfg.patch_size ** 2
    if rows.shape[1] != c * pp:
        raise ValueError(f"image rows of width {rows.shape[1]}; single frames are {c * pp} wide")
    return rows.reshape(-1, c, 1, pp).expand(-1, -1, tp, -1).reshape(rows.shape[0], c * tp * pp)


def video_frame_indices(total: int, video_fps: float, cfg: VisionProcessingConfig,
                        fps: float | None = None, max_frames: int | None = None) -> list[int]:
    fps = fps or cfg.video_fps
    max_frames = min(max_frames or cfg.video_max_frames, cfg.video_max_frames)
    n = int(total / (video_fps or 24) * fps)
    n = min(max(n, cfg.video_min_frames), max_frames, total)
    return np.linspace(0, total - 1, n).round().astype(int).tolist()


def process_video(frames: np.ndarray, frame_indices: list[int], video_fps: float, cfg: VisionProcessingConfig,
                  min_pixels: int | None = None, max_pixels: int | None = None):
    """Sampled frames (T, H, W, 3) uint8 -> uint8 patches, grid (gt, gh, gw), timestamps per gt."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    t = x.shape[0]
    min_pixels, max_pixels = min_pixels or cfg.video_min_pixels, max_pixels or cfg.video_max_pixels
    if cfg.cap_pixels_per_frame:          # each frame at most max_video_tokens, or its share of the budget
        per_frame = max(min(cfg.max_video_tokens * cfg.factor ** 2, max_pixels // t), int(min_pixels * 1.05))
        max_pixels = per_frame * t
    h, w = smart_resize(x.shape[2], x.shape[3], cfg.factor, min_pixels, max_pixels, num_frames=t,
                        temporal_factor=cfg.temporal_patch_size)
    x = _resize(x, h, w)
    pad = -t % cfg.temporal_patch_size
    if pad:
        x = torch.cat((x, x[-1:].expand(pad, -1, -1, -1)))
    pixel_values, grid = _patchify(x, cfg)
    return pixel_values, grid, video_timestamps(frame_indices, video_fps, cfg.temporal_patch_size)


def video_timestamps(indices: list[int], fps: float, temporal_patch: int) -> list[float]:
    idx = list(indices)
    if len(idx) % temporal_patch:
        idx += [idx[-1]] * (temporal_patch - len(idx) % temporal_patch)
    times = [i / fps for i in idx]
    return [(times[i] + times[i + temporal_patch - 1]) / 2 for i in range(0, len(times), temporal_patch)]
