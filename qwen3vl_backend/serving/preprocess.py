"""What the `preprocess` Triton model does, as plain Python: request -> model-ready arrays.

`text_input` is either a plain prompt (used as is) or a JSON chat request with `messages`
(rendered with the chat template; its sampling fields merge into `sampling_parameters`). Images
from the `image` input are prepended to the last user message of a chat, or as vision blocks
ahead of a plain prompt that has no image placeholder of its own.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from ..processing.chat import MediaRef, RequestError
from ..processing.media import MediaPolicy
from ..processing.processor import IMAGE_PAD, VISION_END, VISION_START, Processor
from ..sampling_params import SAMPLING_FIELDS, SamplingParams



def parse_json_object(raw: str, what: str) -> dict:
    try:
        value = json.loads(raw) if raw else {}
    except json.JSONDecodeError as e:
        raise RequestError(f"{what} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise RequestError(f"{what} must be a JSON object")
    return value


def preprocess(processor: Processor, text_input: str, images: list, sampling_json: str,
               policy: MediaPolicy, run_jobs=None) -> dict:
    """-> dict of arrays: input_ids (L,), positions (3, L), rope_delta (1,), pixel_values (N, C) uint8
    (normalised in the vit model),
    grid_thw (M, 3), media_hashes (M,), and the merged, validated sampling_parameters JSON."""
    sampling = parse_json_object(sampling_json, "sampling_parameters")
    stripped = text_input.lstrip()
    if stripped.startswith("{"):
        body = parse_json_object(text_input, "text_input")
        if "messages" not in body:
            raise RequestError("a JSON text_input needs 'messages'")
        messages = _with_images(body["messages"], images)
        for k in SAMPLING_FIELDS:
            if body.get(k) is not None and k not in sampling:   # null is OpenAI's "unset"
                sampling[k] = body[k]
        prompt = processor.process_messages(messages, policy, run_jobs, normalize=False)
    else:
        if images and IMAGE_PAD not in text_input:
            text_input = f"{VISION_START}{IMAGE_PAD}{VISION_END}" * len(images) + text_input
        media = processor.load_all([MediaRef("image", img) for img in images], policy, run_jobs, normalize=False)
        prompt = processor.build_prompt(text_input, media)
    params = SamplingParams.from_dict(sampling, coerce_strings=True)     # validate here: fail before the ViT runs
    pixels = [m.pixel_values for m in prompt.media]
    c = processor.cfg
    width = 3 * c.temporal_patch_size * c.patch_size ** 2
    return {
        "input_ids": np.asarray(prompt.prompt_ids, dtype=np.int64),
        "positions": prompt.positions.numpy().astype(np.int64),
        "rope_delta": np.asarray([prompt.rope_delta], dtype=np.int64),
        "pixel_values": (torch.cat(pixels).numpy() if pixels else np.zeros((0, width), np.uint8)),
        "grid_thw": np.asarray([m.grid_thw for m in prompt.media], dtype=np.int64).reshape(-1, 3),
        "media_hashes": np.asarray([m.content_hash.encode() for m in prompt.media], dtype=np.object_),
        "sampling_parameters": np.asarray([json.dumps(_params_dict(params, sampling)).encode()], dtype=np.object_),
    }


def _with_images(messages, images: list):
    if not images:
        return messages
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list")
    messages = [dict(m) if isinstance(m, dict) else m for m in messages]
    users = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise RequestError("images were sent but the chat has no user message to attach them to")
    last = messages[users[-1]]
    content = last.get("content") or ""
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
    last["content"] = [{"type": "image_url", "image_url": {"url": img}} for img in images] + parts
    return messages


def _params_dict(params: SamplingParams, raw: dict) -> dict:
    out = {k: v for k, v in raw.items() if k != "max_completion_tokens"}
    out["max_tokens"] = params.max_tokens
    return out
