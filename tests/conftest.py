"""Shared fixtures: the project's own tiny checkpoints and deterministic test media."""

from __future__ import annotations

import base64
import io
import os
import zlib

import torch

# Triton kernels run in the interpreter on machines without a GPU (CI, this one), and every
# distinct launch is recorded for tests/test_zz_sm90_compile.py to compile for the GPU
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    import launch_record

    launch_record.install()
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("QWEN3VL_TEST_CACHE", ROOT / ".cache" / "tests"))


@pytest.fixture(autouse=True)
def _seeded(request):
    """Every test's unseeded torch draws fixed by its own id (crc32 of the node id), so that its
    inputs do not depend on which tests ran before it: at f243b8c new tests ahead of an unseeded
    W8A8 test changed its draw past its bound, and a run of that test alone could not show it."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _checkpoint(name: str, dense: bool) -> Path:
    from qwen3vl_backend.tools.make_tiny_checkpoint import make_tiny_checkpoint

    out = CACHE / name
    if not (out / "config.json").exists():
        make_tiny_checkpoint(out, dense=dense)
    return out


@pytest.fixture(scope="session")
def tiny_moe() -> Path:
    return _checkpoint("tiny-moe", dense=False)


@pytest.fixture(scope="session")
def tiny_dense() -> Path:
    return _checkpoint("tiny-dense", dense=True)


def first_steps(engine, prompts, steps: int) -> list[list[tuple[int, float]]]:
    """Each prompt's first `steps` greedy tokens with their log-probabilities, run as one batch."""
    from qwen3vl_backend.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True, logprobs=0)
    ids = [engine.add_request(p, params) for p in prompts]
    got = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += [(t, lp) for t, lp, _ in out.logprobs or []]
    return [got[i] for i in ids]


def make_image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """A smooth pattern with noise: resampling differences show up, nothing is flat."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)),
                     ((x + y) * 3) % 256], -1).astype(np.int32)
    arr = np.clip(base + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode == "RGBA":
        alpha = ((x * 7 + y * 3) % 256).astype(np.uint8)
        img = Image.fromarray(np.dstack([arr, alpha]), "RGBA")
    elif mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    return img


def image_bytes(img: Image.Image, fmt: str = "PNG", **save) -> bytes:
    """`img` encoded as `fmt`; `save`: the encoder's options (PIL's Image.save keywords)."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def make_video(path: Path, frames: int = 40, fps: int = 10, width: int = 96, height: int = 64) -> Path:
    """An MPEG-4 clip of a moving pattern, written with PyAV (codec built into every FFmpeg)."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = 2_000_000
        for i in range(frames):
            arr = np.asarray(make_image(width, height, seed=i)).copy()
            arr = np.roll(arr, i * 2, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="session")
def video_file(tmp_path_factory) -> Path:
    return make_video(tmp_path_factory.mktemp("media") / "clip.mp4")


def start_server(repo: Path, root: Path, frontend_args=(), cuda_pool_mb: int = 0):
    """tritonserver + the adapter on free ports for a written repository; the Triton log on failure."""
    from qwen3vl_backend.supervisor import Server, free_ports

    srv = Server(repo, "127.0.0.1", *free_ports(4), "tiny-moe",
                 list(frontend_args), root / "logs", CACHE.parent / "triton", cuda_pool_mb=cuda_pool_mb)
    try:
        srv.wait_ready(timeout_s=300)
    except Exception:
        srv.stop()
        raise RuntimeError((root / "logs" / "tritonserver.log").read_text()[-4000:]) from None
    return srv
