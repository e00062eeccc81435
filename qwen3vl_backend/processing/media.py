"""Fetch and decode media: data: URIs, raw base64, http(s) URLs, and allow-listed local paths.

Every failure a client can cause raises `MediaError` (a RequestError) naming what was wrong.
Videos decode with decord (the model card's choice) and fall back to PyAV where decord is absent.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .chat import RequestError

try:        # SIMD base64: a 3.7 MB data URI decodes in ~2 ms instead of ~15 (same bytes, same errors)
    from pybase64 import b64decode as _b64decode
except ImportError:
    _b64decode = base64.b64decode


class MediaError(RequestError):
    pass


@dataclass(frozen=True)
class MediaPolicy:
    allowed_local_dir: str | None = None     # None: local paths refused
    fetch_timeout_s: float = 10.0
    max_bytes: int = 256 * 1024 * 1024


TRUSTED = MediaPolicy(allowed_local_dir="/")      # the one-shot CLI reads any local file


def fetch_bytes(source, policy: MediaPolicy) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    if not isinstance(source, str):
        raise MediaError(f"media source must be a string, got {type(source).__name__}")
    if source.startswith("data:"):
        header, _, payload = source.partition(",")
        if ";base64" not in header:
            raise MediaError("data: URIs must be base64 encoded")
        return _b64(payload)
    if source.startswith(("http://", "https://")):
        return _http_get(source, policy)
    if source.startswith("file://"):
        source = source[len("file://"):]
    if source.startswith("/") or source.startswith("."):
        return _read_local(source, policy)
    return _b64(source)     # raw base64, as Triton's `image` input carries it


def _b64(payload: str) -> bytes:
    try:
        return _b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"media is not valid base64: {e}") from e


def _http_get(url: str, policy: MediaPolicy) -> bytes:
    import httpx

    try:
        with httpx.Client(timeout=policy.fetch_timeout_s, follow_redirects=True) as client:
            r = client.get(url)
    except httpx.HTTPError as e:
        raise MediaError(f"could not fetch {url}: {type(e).__name__}: {e}") from e
    if r.status_code != 200:
        raise MediaError(f"could not fetch {url}: HTTP {r.status_code}")
    if len(r.content) > policy.max_bytes:
        raise MediaError(f"{url} is larger than {policy.max_bytes} bytes")
    return r.content


def _read_local(path: str, policy: MediaPolicy) -> bytes:
    if policy.allowed_local_dir is None:
        raise MediaError("local media paths are disabled on this server")
    real = os.path.realpath(path)
    root = os.path.realpath(policy.allowed_local_dir)
    if os.path.commonpath([real, root]) != root:
        raise MediaError(f"local path {path} is outside the allowed directory")
    if not os.path.isfile(real):
        raise MediaError(f"local media file {path} does not exist")
    return Path(real).read_bytes()


def decode_image(data: bytes) -> Image.Image:
    """Bytes -> RGB PIL image (RGBA, LA, P and L converted as the reference: PIL's convert)."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise MediaError(f"media is not a decodable image: {e}") from e
    return img if img.mode == "RGB" else img.convert("RGB")


@dataclass
class DecodedVideo:
    frames: np.ndarray            # (T, H, W, 3) uint8, the sampled frames only
    frame_indices: list[int]      # index of each sampled frame in the source
    fps: float                    # source frame rate
    total_frames: int


def decode_video(data: bytes, pick_indices) -> DecodedVideo:
    """Decode `pick_indices(total_frames, fps)` frames of a video file's bytes."""
    try:
        import decord  # noqa: F401
        return _decode_decord(data, pick_indices)
    except ImportError:
        return _decode_av(data, pick_indices)


def _decode_decord(data: bytes, pick_indices) -> DecodedVideo:
    import decord

    with tempfile.NamedTemporaryFile(suffix=".video") as f:
        f.write(data)
        f.flush()
        try:
            vr = decord.VideoReader(f.name, ctx=decord.cpu(0), num_threads=1)
        except Exception as e:  # decord raises its own DECORDError and RuntimeError
            raise MediaError(f"media is not a decodable video: {e}") from e
        total, fps = len(vr), float(vr.get_avg_fps())
        if total == 0:
            raise MediaError("video has no frames")
        idx = pick_indices(total, fps)
        frames = vr.get_batch(list(idx)).asnumpy()
    return DecodedVideo(frames, list(idx), fps, total)


def _decode_av(data: bytes, pick_indices) -> DecodedVideo:
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 24)
            frames = [fr.to_ndarray(format="rgb24") for fr in container.decode(stream)]
    except (av.error.FFmpegError, IndexError, ValueError) as e:
        raise MediaError(f"media is not a decodable video: {e}") from e
    if not frames:
        raise MediaError("video has no frames")
    idx = pick_indices(len(frames), fps)
    return DecodedVideo(np.stack([frames[i] for i in idx]), list(idx), fps, len(frames))
