"""What the `preprocess` Triton model does, as plain Python: request -> model-ready arrays.

`text_input` is either a plain prompt (used as is) or a JSON chat request with `messages`
(rendered with the chat template; its sampling fields merge into `sampling_parameters`). Images
from the `image` input are prepended to the last user message of a chat, or as vision blocks
ahead of a plain prompt that has no image placeholder of its own; each is a data: URI, an
http(s) or file:// URL, or raw base64 (vllm_backend's convention).

Cheap checks come first: JSON, messages, template, sampling values, the per-request media
counts, and the text's own length against the context. Only then is media fetched and decoded,
on the shared `MediaPool`, and the exact prompt length (text plus the merged patches of each
resized image) is checked again before any pixel leaves for the ViT.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import RequestError, check_prompt_length
from ..processing.chat import MEDIA_INPUT, MediaRef
from ..processing.jpeg_gpu import decode_frame
from ..processing.media import Cancel, MediaPolicy
from ..processing.processor import IMAGE_PAD, VISION_END, VISION_START, MediaItem, Processor
from ..processing.vision_inputs import raw_frame_rows
from ..sampling_params import SAMPLING_FIELDS, SamplingParams
from . import json_body
from .media_pool import MediaPool


@dataclass(frozen=True)
class PreprocessLimits:
    max_model_len: int = 8192
    max_images: int = 16          # per request (vLLM's --limit-mm-per-prompt)
    max_videos: int = 2


@dataclass
class _Parsed:
    text: str                     # the rendered prompt, one pad per media item
    refs: list[MediaRef]
    params: SamplingParams
    raw_sampling: dict


def parse_json_object(raw: str, what: str) -> dict:
    try:
        value = json_body.loads(raw) if raw else {}
    except ValueError as e:         # JSONDecodeError, and a number of 4300+ digits (int's limit)
        raise RequestError(f"{what} is not valid JSON: {e}") from e
    except RecursionError:          # the parser recurses per level: a direct client's '[' * 100000
        raise RequestError(f"{what} is not valid JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise RequestError(f"{what} must be a JSON object")
    return value


class Preprocessor:
    def __init__(self, processor: Processor, policy: MediaPolicy, pool: MediaPool,
                 limits: PreprocessLimits = PreprocessLimits(), raw_frames: bool = False,
                 encoded_frames: bool = False):
        """`raw_frames`: a request of images only sends them unresized (the vit resizes them on its
        GPU; `_finish`). `encoded_frames` (with raw_frames): and the JPEGs that the vit decodes to
        the same pixels on its GPU (media.gpu_jpeg_size) undecoded."""
        self.processor, self.policy, self.pool, self.limits = processor, policy, pool, limits
        self.raw_frames, self.encoded_frames = raw_frames, encoded_frames

    def run(self, text_input: str, images: list[str] = (), sampling_json: str = "", cancel: Cancel | None = None,
            timing: dict | None = None, media: list[str] = ()) -> dict:
        """Preprocess one request -> its arrays; raises RequestError/SamplingError for the client's
        mistakes. The media items are fetched and decoded in parallel on the pool, within its
        per-request timeout. `timing`, when given, gets each step's milliseconds (and each item's).
        `media`: sources that a JSON text_input's media parts name as "media-input:N" (the OpenAI
        adapter sends a request's data URIs so, and the JSON left to parse here is small)."""
        t0 = time.perf_counter()
        parsed = self._parse(text_input, list(images), sampling_json, list(media))
        t1 = time.perf_counter()
        media = []
        if parsed.refs:
            # images only: each image's rows carry its frame once (the vit repeats it over the
            # temporal patch on its GPU), half the bytes to copy and send (served 235B-A22B, two
            # 1280x720 images: TTFT 200.7 ms against 220.3 with full rows in one lease)
            single = all(r.kind == "image" for r in parsed.refs)
            media = self.pool.run_all(self.processor.media_jobs(parsed.refs, self.policy, normalize=False,
                                                                single_frame=single,
                                                                raw_frame=single and self.raw_frames,
                                                                encoded_frame=self.encoded_frames), cancel)
        t2 = time.perf_counter()
        arrays = self._finish(parsed, media)
        if timing is not None:
            timing.update(parse=(t1 - t0) * 1e3, media=(t2 - t1) * 1e3, finish=(time.perf_counter() - t2) * 1e3,
                          items=[m.timing for m in media])
        return arrays

    # -- steps ---------------------------------------------------------------------------------
    def _parse(self, text_input: str, images: list[str], sampling_json: str, media: list[str] = ()) -> _Parsed:
        sampling = parse_json_object(sampling_json, "sampling_parameters")
        is_chat = text_input.lstrip().startswith("{")
        if media and not is_chat:
            raise RequestError("the media input is for a JSON text_input whose media parts name "
                               f"'{MEDIA_INPUT}N'; this text_input is a plain prompt")
        if is_chat:
            body = parse_json_object(text_input, "text_input")
            if "messages" not in body:
                raise RequestError("a JSON text_input needs 'messages'")
            for k in SAMPLING_FIELDS:
                if body.get(k) is not None and k not in sampling:   # null is OpenAI's "unset"
                    sampling[k] = body[k]
            text, refs = self.processor.render(_with_images(body["messages"], images), body.get("tools"),
                                               body.get("chat_template_kwargs"),
                                               body.get("add_generation_prompt", True),
                                               body.get("continue_final_message", False))
            refs = _resolve_media_inputs(refs, media)
        else:
            text = text_input
            if not text and not images:         # else llm's "input_ids is required", for a prompt never sent
                raise RequestError("text_input is empty: send a prompt, a JSON chat, or images")
            if images and IMAGE_PAD not in text:
                text = f"{VISION_START}{IMAGE_PAD}{VISION_END}" * len(images) + text
            refs = [MediaRef("image", img) for img in images]
        self._check_counts(refs)
        params = SamplingParams.from_dict(sampling, coerce_strings=True)
        # the text alone (one pad per media item) already past the context: refuse before any fetch
        check_prompt_length(len(self.processor.tokenizer.encode(text)), self.limits.max_model_len)
        return _Parsed(text, refs, params, sampling)

    def _check_counts(self, refs: list[MediaRef]) -> None:
        for kind, limit in (("image", self.limits.max_images), ("video", self.limits.max_videos)):
            n = sum(r.kind == kind for r in refs)
            if n > limit:
                raise RequestError(f"{n} {kind}s in one request; this server takes at most {limit} "
                                   f"(--limit-mm-per-prompt)")

    def _finish(self, parsed: _Parsed, media: list[MediaItem]) -> dict:
        """-> dict of arrays: input_ids (L,), positions (3, L), rope_delta (1,), pixel_values (N, C)
        uint8 (normalised in the vit model; C is the patch width, or its single-frame part when
        every item is an image), grid_thw (M, 3), media_hashes (M,), the merged, validated
        sampling_parameters JSON, and source_sizes: (M, 2) when every item came unresized
        (raw_frames), each image's (H, W), and pixel_values their pixels (sum H*W, 3) for the vit to
        resize; (0, 2) otherwise. Some items unresized and some not: those are resized here.
        jpeg_bytes (B,) uint8 and jpeg_lengths (M,): with source_sizes, the items that came as
        JPEGs (encoded_frames) have their bytes there, in order, and no pixels in pixel_values
        (the others' counts are 0); (0,) and (0,) otherwise, such items decoded and resized here."""
        prompt = self.processor.build_prompt(parsed.text, media)
        check_prompt_length(len(prompt.prompt_ids), self.limits.max_model_len)    # before the ViT
        cfg = self.processor.cfg
        raw = bool(prompt.media) and all(m.source_size for m in prompt.media)
        pixels = [m.pixel_values if raw or not m.source_size else
                  raw_frame_rows(_host_pixels(m), m.source_size, m.grid_thw, cfg) for m in prompt.media]
        encoded = [m.encoded or b"" for m in prompt.media] if raw and any(m.encoded for m in prompt.media) else []
        width = 3 if raw else cfg.patch_width
        return {
            "input_ids": np.asarray(prompt.prompt_ids, dtype=np.int64),
            "positions": prompt.positions.numpy().astype(np.int64),
            "rope_delta": np.asarray([prompt.rope_delta], dtype=np.int64),
            # one item's rows as they are (a copy of 2.7 MB for a 1280x720 image saved), several joined
            "pixel_values": (pixels[0].contiguous().numpy() if len(pixels) == 1 else torch.cat(pixels).numpy()
                             if pixels else np.zeros((0, width), np.uint8)),
            "grid_thw": np.asarray([m.grid_thw for m in prompt.media], dtype=np.int64).reshape(-1, 3),
            "media_hashes": np.asarray([m.content_hash.encode() for m in prompt.media], dtype=np.object_),
            "sampling_parameters": np.asarray([json.dumps(_params_dict(parsed.params, parsed.raw_sampling)).encode()],
                                              dtype=np.object_),
            "source_sizes": np.asarray([m.source_size for m in prompt.media] if raw else [], dtype=np.int64).reshape(-1, 2),
            "jpeg_bytes": np.frombuffer(bytearray().join(encoded), dtype=np.uint8),
            "jpeg_lengths": np.asarray([len(e) for e in encoded], dtype=np.int64),
        }


def _host_pixels(item: MediaItem) -> torch.Tensor:
    """An unresized item's (H*W, 3) pixels, decoding here one that came as a JPEG."""
    if item.encoded is None:
        return item.pixel_values
    return decode_frame(item.encoded, *item.source_size)


def _resolve_media_inputs(refs: list[MediaRef], media: list[str]) -> list[MediaRef]:
    """Media parts whose url is "media-input:N" take the request's N-th `media` input; every
    `media` entry must be named by some part."""
    used = set()
    out = []
    for ref in refs:
        src = ref.source
        if isinstance(src, str) and src.startswith(MEDIA_INPUT):
            tail = src[len(MEDIA_INPUT):]
            if not (tail.isascii() and tail.isdigit()) or int(tail) >= len(media):     # not "²"
                raise RequestError(f"media part url {src[:40]!r} names no entry of the media input "
                                   f"({len(media)} sent)")
            used.add(int(tail))
            ref = MediaRef(ref.kind, media[int(tail)], ref.options)
        out.append(ref)
    unused = sorted(set(range(len(media))) - used)
    if unused:
        raise RequestError(f"media input entries {unused} are named by no media part ('{MEDIA_INPUT}N')")
    return out


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
    """The fields the request set, as validated and typed (`"32"` from a Triton client is 32 here)."""
    out = {k: getattr(params, k) for k in raw if k != "max_completion_tokens" and raw[k] is not None}
    out["max_tokens"] = params.max_tokens
    return out
