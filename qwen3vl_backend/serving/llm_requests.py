"""What the Triton `llm` model does with a request apart from Triton itself: its inputs read into
the engine's prompt, vision outputs, sampling and response flags (`parse_request`), and the
engine's outputs sent back through the request's sender (`ResponseStream`). `pb_utils` is handed
in: the Python backend stub's module when served, a fake in tests (tests/test_llm_requests.py),
so that this logic is tested without tritonserver.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from ..processing.processor import MediaItem, ProcessedPrompt
from ..sampling_params import SamplingParams
from .preprocess import parse_json_object
from .stage_timing import stage_line
from .triton_params import error_response
from .triton_tensors import as_torch

# TRITONSERVER_RESPONSE_COMPLETE_FINAL; the stub defines its pb_utils name only at run time
FINAL = 1
FLAGS = ("stream", "exclude_input_in_output", "return_num_input_tokens", "return_num_output_tokens")


def flag(pb_utils, request, name) -> bool:
    t = pb_utils.get_input_tensor_by_name(request, name)
    return t is not None and t.as_numpy().size > 0 and bool(t.as_numpy().reshape(-1)[0])


def parse_request(pb_utils, request, merge_unit: int, sampling_defaults: dict):
    """-> (ProcessedPrompt, vision outputs or None, SamplingParams, response flags); ValueError
    (a RequestError or SamplingError) for what the client sent wrong."""
    def get(name):       # host-side inputs: token ids, positions, strings
        t = pb_utils.get_input_tensor_by_name(request, name)
        return None if t is None else (t.as_numpy() if t.is_cpu() else as_torch(t).cpu().numpy())

    raw_ids = get("input_ids")
    if raw_ids is None or raw_ids.size == 0:
        raise ValueError("input_ids is required (and must not be empty)")
    ids = raw_ids.reshape(-1).astype(np.int64).tolist()
    pos = get("positions")
    delta = get("rope_delta")
    positions = torch.from_numpy(pos.reshape(3, -1).astype(np.int64)) if pos is not None else \
        torch.arange(len(ids)).expand(3, -1)
    if positions.shape[1] != len(ids):
        raise ValueError(f"positions cover {positions.shape[1]} tokens, input_ids has {len(ids)}")
    prompt = ProcessedPrompt(ids, _media(get("grid_thw"), get("media_hashes"), merge_unit), positions,
                             int(delta.reshape(-1)[0]) if delta is not None else 0)
    embeds, deepstack = (as_torch(pb_utils.get_input_tensor_by_name(request, name))
                         for name in ("visual_embeds", "deepstack"))
    vision = None
    if embeds is not None and embeds.shape[0] > 0:
        vision = (embeds, [] if deepstack is None else list(deepstack.unbind(0)))
    raw = get("sampling_parameters")
    text = raw.reshape(-1)[0] if raw is not None and raw.size else b""
    params = SamplingParams.from_dict(parse_json_object(text.decode("utf-8", "replace") if isinstance(text, bytes)
                                                        else text, "sampling_parameters"), coerce_strings=True,
                                    defaults=sampling_defaults)
    flags = {k: flag(pb_utils, request, k) for k in FLAGS}
    return prompt, vision, params, flags


def _media(grids, hashes, merge_unit: int):
    """Media identities for the prefix cache (pixels stay with the ViT)."""
    if grids is None or hashes is None or len(hashes) != len(grids.reshape(-1, 3)):
        return []
    out = []
    for g, h in zip(grids.reshape(-1, 3), hashes.reshape(-1)):
        t, hh, w = (int(x) for x in g)
        out.append(MediaItem("media", torch.empty(0), (t, hh, w), h.decode() if isinstance(h, bytes) else str(h),
                             t * hh * w // merge_unit))
    return out


class ResponseStream:
    """One request's responses: a response per text delta when streaming, else one final response
    with the whole text (the prompt's text first unless exclude_input_in_output); logprobs ride
    with the next response sent; an error is the request's last response (a client's marked so)."""

    def __init__(self, pb_utils, sender, flags, tokenizer, prompt_ids, client_id, on_finish, timing=None):
        """`timing` (QWEN3VL_STAGE_TIMING): {"parse": ms, "started": execute's time.monotonic()};
        the first output logs a stage line with both and the engine's share up to it."""
        self.pb_utils = pb_utils
        self.sender, self.flags, self.on_finish, self.timing = sender, flags, on_finish, timing
        self.tokenizer, self.prompt_ids, self.client_id = tokenizer, prompt_ids, client_id
        self.text = ""
        self.logprobs = []                # of tokens not yet sent (a response may carry no text)
        self.prompt_logprobs = None       # sent with the next response

    def on_output(self, out):
        if self.timing is not None:         # the first output: where this request's time to it went
            started = self.timing.pop("started")
            self.pb_utils.Logger.log_info(f"stage llm {self.client_id}: {stage_line(self.timing, started)}")
            self.timing = None
        if isinstance(out, Exception) or out.finished:
            self.on_finish()
        if isinstance(out, Exception):
            self.sender.send(error_response(self.pb_utils, out, "llm", self.client_id), flags=FINAL)
            return
        if out.logprobs:
            self.logprobs += out.logprobs
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if self.flags["stream"]:
            if out.delta_text or out.finished:
                self.sender.send(self._response(out.delta_text, out), flags=FINAL if out.finished else 0)
            return
        self.text += out.delta_text
        if out.finished:
            text = self.text
            if not self.flags["exclude_input_in_output"]:
                text = self.tokenizer.decode(self.prompt_ids) + text
            self.sender.send(self._response(text, out), flags=FINAL)

    def _response(self, text, out):
        pb_utils = self.pb_utils
        tensors = [pb_utils.Tensor("text_output", np.array([text.encode()], dtype=np.object_)),
                   pb_utils.Tensor("finish_reason", np.array([(out.finish_reason or "").encode()], dtype=np.object_))]
        if self.flags["return_num_input_tokens"]:
            tensors.append(pb_utils.Tensor("num_input_tokens", np.array([out.num_prompt_tokens], np.uint32)))
            tensors.append(pb_utils.Tensor("num_cached_tokens", np.array([out.cached_tokens], np.uint32)))
        if self.flags["return_num_output_tokens"]:
            tensors.append(pb_utils.Tensor("num_output_tokens", np.array([out.num_output_tokens], np.uint32)))
        if self.logprobs:
            tensors.append(pb_utils.Tensor("logprobs", np.array([json.dumps(self.logprobs).encode()],
                                                                dtype=np.object_)))
            self.logprobs = []
        if self.prompt_logprobs is not None:
            tensors.append(pb_utils.Tensor("prompt_logprobs", np.array([json.dumps(self.prompt_logprobs).encode()],
                                                                       dtype=np.object_)))
            self.prompt_logprobs = None
        return pb_utils.InferenceResponse(tensors)
