"""Parity with transformers' Qwen3-VL (the oracle) on the project's tiny MoE and dense checkpoints.

For each case: prompt token ids identical to the reference processor's; pixel values and grids
identical; prompt logits within 1e-4 of the reference (max abs, relative to the logit scale);
32 greedy tokens identical to the reference `generate`.
"""

from __future__ import annotations

import pytest
import torch

from conftest import data_uri, image_bytes, make_image
from qwen3vl_backend import generate
from qwen3vl_backend.config import EngineConfig
from qwen3vl_backend.engine.llm_engine import LLMEngine
from qwen3vl_backend.processing.media import decode_video
from qwen3vl_backend.processing.processor import Processor

oracle = pytest.importorskip("oracle")

GREEDY_TOKENS = 32
LOGIT_TOL = 1e-4


def _img_part(img):
    return {"type": "image_url", "image_url": {"url": data_uri(image_bytes(img))}}


def _cases(video_path):
    a, b = make_image(300, 200, 1), make_image(120, 180, 2)
    return {
        "text": ([{"role": "user", "content": "Tell me a story about a small robot."}], [], None),
        "one_image": ([{"role": "user", "content": [_img_part(a), {"type": "text", "text": "What is this?"}]}],
                      [a], None),
        "two_images": ([{"role": "user", "content": [_img_part(a), _img_part(b),
                                                     {"type": "text", "text": "Compare them."}]}], [a, b], None),
        "odd_size_image": ([{"role": "user", "content": [{"type": "text", "text": "Describe:"},
                                                         _img_part(make_image(333, 257, 3))]}],
                           [make_image(333, 257, 3)], None),
        # the reference composites transparency onto white (transformers >= 5.18)
        "rgba_image": ([{"role": "user", "content": [_img_part(make_image(90, 70, 4, "RGBA")),
                                                     {"type": "text", "text": "Colours?"}]}],
                       [make_image(90, 70, 4, "RGBA")], None),
        "video": ([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video_path.as_uri()}},
                                                {"type": "text", "text": "What happens?"}]}], [], video_path),
        "system_multi_turn": ([
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Hi, who are you?"},
            {"role": "assistant", "content": "An assistant."},
            {"role": "user", "content": [_img_part(b), {"type": "text", "text": "And this picture?"}]},
        ], [b], None),
        "chinese": ([{"role": "user", "content": "请用中文介绍一下长城的历史。"}], [], None),
    }


def _reference_inputs(processor, messages, images, video_path):
    """The reference processor's view of the same request (images as PIL, video as decoded frames)."""
    from transformers.video_utils import VideoMetadata

    ref_msgs = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "image"} if p["type"] == "image_url" else
                       {"type": "video"} if p["type"] == "video_url" else p for p in content]
        ref_msgs.append({"role": m["role"], "content": content})
    text = processor.apply_chat_template(ref_msgs, tokenize=False, add_generation_prompt=True)
    kwargs = {}
    if images:
        kwargs["images"] = images
    if video_path is not None:
        full = decode_video(video_path.read_bytes(), lambda total, fps: list(range(total)))
        kwargs["videos"] = [full.frames]
        kwargs["video_metadata"] = [VideoMetadata(total_num_frames=full.total_frames, fps=full.fps,
                                                  frames_indices=list(range(full.total_frames)))]
        kwargs["do_sample_frames"] = True
        kwargs["cap_pixels_per_frame"] = False
    return processor(text=[text], return_tensors="pt", **kwargs)


@pytest.fixture(scope="module", params=["tiny_moe", "tiny_dense"])
def stack(request):
    path = request.getfixturevalue(request.param)
    ref_processor, ref_model = oracle.load_reference(str(path))
    engine = LLMEngine(EngineConfig(model_path=str(path), device="cpu", dtype="float32"))
    return path, ref_processor, ref_model, engine


CASES = ["text", "one_image", "two_images", "odd_size_image", "rgba_image", "video", "system_multi_turn", "chinese"]


@pytest.mark.parametrize("case", CASES)
def test_matches_transformers(stack, case, video_file):
    path, ref_processor, ref_model, engine = stack
    messages, images, video = _cases(video_file)[case]
    ref = _reference_inputs(ref_processor, messages, images, video)

    ours = Processor(path, engine.tokenizer).process_messages(messages)
    assert ours.prompt_ids == ref["input_ids"][0].tolist()
    for kind, key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                ("video", "pixel_values_videos", "video_grid_thw")):
        items = [m for m in ours.media if m.kind == kind]
        assert bool(items) == (key in ref)
        if items:
            assert [list(m.grid_thw) for m in items] == ref[grid_key].tolist()
            torch.testing.assert_close(torch.cat([m.pixel_values for m in items]), ref[key], rtol=0, atol=1e-6)

    with torch.no_grad():
        ref_logits = ref_model(**ref).logits[0].float()
    logits = engine.prompt_logits(ours)
    scale = ref_logits.abs().max()
    assert ((logits - ref_logits).abs().max() / scale).item() <= LOGIT_TOL

    with torch.no_grad():
        ref_out = ref_model.generate(**ref, max_new_tokens=GREEDY_TOKENS, do_sample=False)
    ref_tokens = ref_out[0, ref["input_ids"].shape[1]:].tolist()
    result = generate.run(str(path), {"messages": messages, "temperature": 0, "max_tokens": GREEDY_TOKENS},
                          engine=engine)
    assert result["prompt_token_ids"] == ours.prompt_ids
    assert result["output_token_ids"] == ref_tokens
    assert len(ref_tokens) == GREEDY_TOKENS or ref_tokens[-1] in engine.eos_ids


def test_interleaved_and_contiguous_mrope_differ(tiny_moe):
    """Guards the test above: had we used Qwen2-VL's contiguous mRoPE, image logits would move."""
    from qwen3vl_backend.layers.rotary import mrope_axis_map

    inter = mrope_axis_map(16, (6, 5, 5), True)
    contig = mrope_axis_map(16, (6, 5, 5), False)
    assert inter[:6].tolist() == [0, 1, 2, 0, 1, 2]
    assert contig[:6].tolist() == [0] * 6 and not torch.equal(inter, contig)


@pytest.mark.parametrize("cap", [False, True])
def test_video_pixel_cap_matches_the_reference(tiny_dense, cap):
    """transformers' per-frame pixel cap (`cap_pixels_per_frame`): off by default as in 5.25, and
    when a checkpoint's video_preprocessor_config turns it on, the same grid and pixels as the
    reference. Eight 1280x720 frames: the cap binds (786,432 pixels a frame), the budget does not."""
    import dataclasses

    import numpy as np
    from transformers import AutoVideoProcessor
    from transformers.video_utils import VideoMetadata

    from qwen3vl_backend.processing.vision_inputs import VisionProcessingConfig, normalize_patches, process_video

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (8, 720, 1280, 3), dtype=np.uint8)
    cfg = dataclasses.replace(VisionProcessingConfig.from_dir(tiny_dense), cap_pixels_per_frame=cap)
    patches, grid, _ = process_video(frames, list(range(8)), 4.0, cfg)
    ref = AutoVideoProcessor.from_pretrained(str(tiny_dense))(
        videos=[frames], video_metadata=[VideoMetadata(total_num_frames=8, fps=4.0, frames_indices=list(range(8)))],
        do_sample_frames=False, cap_pixels_per_frame=cap, return_tensors="pt")
    assert list(grid) == ref["video_grid_thw"][0].tolist()
    assert (grid[1] * grid[2] * 16 * 16 <= 768 * 32 * 32) == cap         # within 768 merged patches a frame
    torch.testing.assert_close(normalize_patches(patches, cfg), ref["pixel_values_videos"], rtol=0, atol=1e-6)


def test_our_packages_take_no_name_another_installed_distribution_has():
    """The oracle's own dependencies import by top-level name: transformers 5.25 requires Hugging
    Face's `kernels`, whose name our Triton kernels' package had until it became
    `qwen3vl_kernels`. With both, run from the repository root (as the tests and the server run),
    `from kernels import ...` inside transformers found ours and no Qwen3-VL model could be imported;
    installed from a wheel, one package's files would land on the other's. So none of the packages
    pyproject.toml installs may be a top-level name another installed distribution provides."""
    import importlib.metadata as md
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    include = re.search(r"\[tool\.setuptools\.packages\.find\]\s*include\s*=\s*\[([^\]]*)\]", text)
    ours = {name.strip().strip('"').rstrip("*") for name in include.group(1).split(",") if name.strip()}
    assert {"qwen3vl_backend", "qwen3vl_kernels"} <= ours, ours
    provided = md.packages_distributions()
    others = {name: sorted(set(provided.get(name, ())) - {"qwen3vl-triton"}) for name in ours}
    clashes = {name: dists for name, dists in others.items() if dists}
    assert not clashes, f"installed distributions provide these top-level names too: {clashes}"
