"""Chat request -> prompt token ids, media pixel tensors and mRoPE positions.

Mirrors transformers' Qwen3VLProcessor: render the chat template, replace each image pad with
one pad per merged patch and each video (the template's `<|vision_start|><|video_pad|><|vision_end|>`,
or a bare video pad) with `<t seconds><|vision_start|>pads<|vision_end|>` per temporal patch,
tokenize the expanded text, then compute 3-D positions.
"""

from __future__ import annotations

import functools
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .chat import MediaRef, RequestError, load_chat_template, render_chat
from .media import (BESIDE_DECODE, TRUSTED, Cancel, MediaPolicy, decode_image_array, decode_video, fetch_bytes,
                    gpu_jpeg_size)
from .positions import IMAGE, TEXT, VIDEO, mrope_positions
from .tokenizer import Tokenizer
from .vision_inputs import (VisionProcessingConfig, frame_pixels, image_size_for, normalize_patches, process_image,
                            process_video, raw_frame_fits, video_frame_indices)

IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"


@dataclass
class MediaItem:
    kind: str                        # "image" | "video"
    pixel_values: torch.Tensor       # (patches, C*Tp*P*P): float32 normalised, or uint8 (normalize=False)
    grid_thw: tuple[int, int, int]
    content_hash: str                # identity of the pixels (ViT cache, prefix cache)
    num_tokens: int                  # pad tokens in the prompt (merged patches)
    timestamps: list[float] = field(default_factory=list)
    timing: dict = field(default_factory=dict)     # ms: fetch, decode, process (stage timing logs)
    # (H, W) of an image sent unresized (load_media's raw_frame): pixel_values are its (H*W, 3) pixels
    source_size: tuple[int, int] | None = None
    # a JPEG sent undecoded (load_media's encoded_frame): its bytes; pixel_values are then (0, 3)
    encoded: bytes | None = None


@dataclass
class ProcessedPrompt:
    prompt_ids: list[int]
    media: list[MediaItem]
    positions: torch.Tensor          # (3, L) long
    rope_delta: int
    text: str = ""


class Processor:
    def __init__(self, model_dir: str | Path, tokenizer: Tokenizer | None = None):
        model_dir = Path(model_dir)
        self.tokenizer = tokenizer or Tokenizer(model_dir)
        self.template = load_chat_template(model_dir)
        self.cfg = VisionProcessingConfig.from_dir(model_dir)
        self.image_pad_id = self.tokenizer.token_to_id(IMAGE_PAD)
        self.video_pad_id = self.tokenizer.token_to_id(VIDEO_PAD)

    # -- media ---------------------------------------------------------------------------------
    def load_media(self, ref: MediaRef, policy: MediaPolicy = TRUSTED, normalize: bool = True,
                   cancel: Cancel | None = None, single_frame: bool = False, raw_frame: bool = False,
                   encoded_frame: bool = False) -> MediaItem:
        """Fetch, decode and process one item; `normalize=False` keeps uint8 patches (for transport);
        `single_frame`: an image's rows hold its frame once (vision_inputs.expand_image_rows).
        `raw_frame` (with single_frame, normalize=False): an image within vision_inputs.raw_frame_fits
        of its resize comes unresized, its pixels (H*W, 3) and `source_size` (H, W), for the vit
        to resize on its GPU (vision_inputs.raw_frame_rows). `encoded_frame` (with raw_frame): a JPEG
        that media.gpu_jpeg_size admits comes undecoded, its bytes in `encoded`, for the vit to
        decode on its GPU (jpeg_gpu.decode_frame)."""
        t0 = time.perf_counter()
        data = fetch_bytes(ref.source, policy, cancel)
        digest = BESIDE_DECODE.submit(lambda: hashlib.sha256(data).digest())     # hashed while it decodes
        t1 = t2 = time.perf_counter()
        opts = ref.options
        stamps: list[float] = []
        source = None
        encoded = None
        if ref.kind == "image":
            lo, hi = self._pixel_bounds(opts, self.cfg.image_min_pixels, self.cfg.image_max_pixels)
            raw = raw_frame and single_frame and not normalize
            # a JPEG the vit decodes to these pixels: its header alone read here
            size = gpu_jpeg_size(data, policy.max_image_pixels) if raw and encoded_frame else None
            image = None if size else decode_image_array(data, policy.max_image_pixels)
            height, width = size or image.shape[:2]
            t2 = time.perf_counter()
            h, w = image_size_for(height, width, self.cfg, lo, hi)
            if raw and raw_frame_fits(height, width, h, w):
                source, grid = (height, width), (1, h // self.cfg.patch_size, w // self.cfg.patch_size)
                if image is None:
                    patches, encoded = torch.empty(0, 3, dtype=torch.uint8), data
                else:
                    patches = frame_pixels(image)
            else:
                if image is None:           # past what travels unresized: decoded and resized here
                    image = decode_image_array(data, policy.max_image_pixels)
                patches, grid = process_image(image, self.cfg, lo, hi, repeat_frame=not single_frame)
        else:
            fps, max_frames = _num_opt(opts, "fps"), _int_opt(opts, "max_frames")
            video = decode_video(data, lambda total, vfps: video_frame_indices(total, vfps, self.cfg, fps, max_frames),
                                 policy, cancel)
            lo, hi = self._pixel_bounds(opts, self.cfg.video_min_pixels, self.cfg.video_max_pixels)
            patches, grid, stamps = process_video(video.frames, video.frame_indices, video.fps, self.cfg, lo, hi)
        pixels = normalize_patches(patches, self.cfg) if normalize else patches
        # an image's pixels follow from its bytes and grid; a video's frames also from the sampling asked
        frames = {} if ref.kind == "image" else {k: opts.get(k) for k in ("fps", "max_frames")}
        item = MediaItem(ref.kind, pixels, grid, _hash(digest.result(), grid, frames), self._num_tokens(grid), stamps,
                         source_size=source, encoded=encoded)
        t3 = time.perf_counter()
        item.timing = {"fetch": (t1 - t0) * 1e3, "decode": (t2 - t1) * 1e3, "process": (t3 - t2) * 1e3}
        return item

    @staticmethod
    def _pixel_bounds(opts: dict, server_min: int, server_max: int) -> tuple[int, int]:
        """Per-request min/max pixels can only lower the server's: a request may ask for fewer
        pixels (cheaper), never for more than the server would give it."""
        req_lo, req_hi = _int_opt(opts, "min_pixels"), _int_opt(opts, "max_pixels")
        if req_lo and req_hi and req_lo > req_hi:
            raise RequestError(f"min_pixels {req_lo} exceeds max_pixels {req_hi}")
        hi = min(req_hi or server_max, server_max)
        return min(req_lo or server_min, server_min, hi), hi

    def _num_tokens(self, grid) -> int:
        return grid[0] * grid[1] * grid[2] // self.cfg.merge_size ** 2

    # -- prompt --------------------------------------------------------------------------------
    def render(self, messages: list[dict], tools=None, template_kwargs=None, add_generation_prompt=True,
               continue_final_message=False) -> tuple[str, list[MediaRef]]:
        return render_chat(self.template, messages, tools, template_kwargs, add_generation_prompt,
                           continue_final_message)

    def process_messages(self, messages: list[dict], policy: MediaPolicy = TRUSTED, run_jobs=None,
                         normalize: bool = True) -> ProcessedPrompt:
        """`run_jobs(list of job(cancel) callables) -> results` runs the media work (default: in turn)."""
        text, refs = self.render(messages)
        return self.build_prompt(text, self.load_all(refs, policy, run_jobs, normalize))

    def media_jobs(self, refs: list[MediaRef], policy: MediaPolicy = TRUSTED, normalize: bool = True,
                   single_frame: bool = False, raw_frame: bool = False, encoded_frame: bool = False) -> list:
        """One `job(cancel) -> MediaItem` per reference, for a pool to run."""
        return [functools.partial(self.load_media, r, policy, normalize, single_frame=single_frame, raw_frame=raw_frame,
                                  encoded_frame=encoded_frame) for r in refs]

    def load_all(self, refs: list[MediaRef], policy: MediaPolicy = TRUSTED, run_jobs=None,
                 normalize: bool = True) -> list[MediaItem]:
        jobs = self.media_jobs(refs, policy, normalize)
        return run_jobs(jobs) if run_jobs is not None else [job(None) for job in jobs]

    def build_prompt(self, text: str, media: list[MediaItem]) -> ProcessedPrompt:
        """Expand the pads of a rendered prompt for `media` (in order), tokenize, and position."""
        expanded = self._expand(text, media)
        if any(m.kind == "video" for m in media):
            ids = self.tokenizer.encode(expanded)
        else:       # the same ids: a special token splits the text, so the pads are expanded as ids
            ids = self._expand_image_ids(self.tokenizer.encode(text), media)
        types = [IMAGE if t == self.image_pad_id else VIDEO if t == self.video_pad_id else TEXT for t in ids]
        grids = {IMAGE: [m.grid_thw for m in media if m.kind == "image"],
                 VIDEO: [m.grid_thw for m in media if m.kind == "video"]}
        positions, delta = mrope_positions(types, grids, self.cfg.merge_size)
        return ProcessedPrompt(ids, media, positions, delta, expanded)

    def _expand_image_ids(self, ids: list[int], media: list[MediaItem]) -> list[int]:
        """Each image pad id (one per image, in order) -> one per merged patch. Tokenizing the
        expanded text took 2.5 ms for two 1280x720 images (1,760 pads) on a fast core."""
        counts = iter(m.grid_thw[0] * m.grid_thw[1] * m.grid_thw[2] // self.cfg.merge_size ** 2 for m in media)
        out: list[int] = []
        start = 0
        for i, t in enumerate(ids):
            if t == self.image_pad_id:
                out.extend(ids[start:i])
                out.extend([t] * next(counts))
                start = i + 1
        out.extend(ids[start:])
        return out

    def process_text(self, prompt: str) -> ProcessedPrompt:
        """A plain prompt, tokenized as is (no template)."""
        return self.build_prompt(prompt, [])

    def _expand(self, text: str, media: list[MediaItem]) -> str:
        images = [m for m in media if m.kind == "image"]
        videos = [m for m in media if m.kind == "video"]
        if text.count(IMAGE_PAD) != len(images) or text.count(VIDEO_PAD) != len(videos):
            raise RequestError(f"prompt has {text.count(IMAGE_PAD)} image and {text.count(VIDEO_PAD)} video "
                               f"placeholders for {len(images)} images and {len(videos)} videos")
        unit = self.cfg.merge_size ** 2
        out, img_i, vid_i, pos = [], 0, 0, 0
        while True:
            i, v = text.find(IMAGE_PAD, pos), text.find(VIDEO_PAD, pos)
            if i < 0 and v < 0:
                out.append(text[pos:])
                break
            if v < 0 or (0 <= i < v):
                m = images[img_i]
                img_i += 1
                out.append(text[pos:i] + IMAGE_PAD * (m.grid_thw[0] * m.grid_thw[1] * m.grid_thw[2] // unit))
                pos = i + len(IMAGE_PAD)
            else:
                m = videos[vid_i]
                vid_i += 1
                per_frame = m.grid_thw[1] * m.grid_thw[2] // unit
                # the template's `<|vision_start|><|video_pad|><|vision_end|>` goes whole: each frame
                # brings its own pair (Qwen's processor and transformers 5.25; 5.24 kept an outer pair too)
                start, end = v - len(VISION_START), v + len(VIDEO_PAD)
                wrapped = start >= pos and text.startswith(VISION_START, start) and text.startswith(VISION_END, end)
                out.append(text[pos:start if wrapped else v] + "".join(
                    f"<{ts:.1f} seconds>{VISION_START}{VIDEO_PAD * per_frame}{VISION_END}" for ts in m.timestamps))
                pos = end + len(VISION_END) if wrapped else end
        return "".join(out)


def _hash(digest: bytes, grid, frames: dict) -> str:
    """The item's identity (ViT cache, prefix cache): its encoded bytes (their SHA-256 `digest`),
    its grid and (videos) the sampling options that chose its frames, which together fix its
    pixels. The bytes, not the patches: a 1280x720 image's patches are 5.4 MB (the frame twice
    over the temporal patch), its JPEG under 1 MB, and a slow host spends milliseconds a megabyte
    on the hash."""
    return hashlib.sha256(repr((tuple(grid), sorted(frames.items()))).encode() + digest).hexdigest()[:32]


def _int_opt(opts: dict, key: str) -> int | None:
    v = opts.get(key)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise RequestError(f"{key} must be a positive integer, got {v!r}")
    return v


def _num_opt(opts: dict, key: str) -> float | None:
    v = opts.get(key)
    if v is None:
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
        raise RequestError(f"{key} must be a positive number, got {v!r}")
    return float(v)
