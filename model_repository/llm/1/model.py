"""Triton `llm` (decoupled): owns the engine and streams tokens.

`execute` converts a request's tensors and hands it to the engine loop thread; responses go
back through the request's sender as the engine produces them: one per text delta when
`stream` is set, else one final response with the whole text.
"""

import dataclasses
import json
import time
import uuid

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from qwen3vl_backend.config import EngineConfig
from qwen3vl_backend.engine.llm_engine import LLMEngine, RequestOutput
from qwen3vl_backend.processing.processor import MediaItem, ProcessedPrompt
from qwen3vl_backend.sampling_params import SamplingParams
from qwen3vl_backend.serving.cancel import CancelRegistry
from qwen3vl_backend.serving.engine_loop import EngineLoop
from qwen3vl_backend.serving.preprocess import parse_json_object
from qwen3vl_backend.serving.stage_timing import STAGE_TIMING, stage_line
from qwen3vl_backend.serving.triton_metrics import TritonEngineMetrics
from qwen3vl_backend.serving.triton_params import error_response, model_settings
from qwen3vl_backend.serving.triton_tensors import as_torch

# TRITONSERVER_RESPONSE_COMPLETE_FINAL; the stub defines its pb_utils name only at run time
FINAL = 1
ENGINE_KEYS = {f.name for f in dataclasses.fields(EngineConfig)}


class TritonPythonModel:
    def initialize(self, args):
        s = model_settings(args)
        self.engine = LLMEngine(EngineConfig.from_settings({k: v for k, v in s.items() if k in ENGINE_KEYS}))
        # the first requests' kernels compile now, not in their time to first token
        pb_utils.Logger.log_info(f"llm: warmed up in {self.engine.warm_up():.1f} s")
        self.merge_unit = self.engine.runner.model_cfg.vision.spatial_merge_size ** 2
        self.metrics = TritonEngineMetrics(pb_utils)
        arrived = pb_utils.MetricFamily("qwen3vl_llm_visual_features_total", "Requests' visual features by where they "
                                        "arrived (gpu: --keep-mm-feature-on-device, host)", pb_utils.MetricFamily.COUNTER)
        self._arrived = (arrived, {True: arrived.Metric({"where": "gpu"}), False: arrived.Metric({"where": "host"})})
        self.loop = EngineLoop(self.engine, on_stats=self.metrics.report)
        self.live = CancelRegistry()              # client request id -> its live requests' Cancels

    def execute(self, requests):
        for request in requests:
            started = time.monotonic()
            sender = request.get_response_sender()
            client_id = request.request_id()
            if _flag(request, "cancel"):
                self.live.cancel(client_id)
                sender.send(flags=FINAL)
                continue
            try:
                prompt, vision, params, flags = _parse(request, self.merge_unit, self.engine.sampling_defaults)
                if vision is not None:
                    self._arrived[1][vision[0].is_cuda].increment(1)
            except Exception as e:
                sender.send(error_response(pb_utils, e, "llm", client_id), flags=FINAL)
                continue
            parsed = time.monotonic()
            cancel = self.live.open(client_id)
            stream = _Stream(sender, flags, self.engine.tokenizer, prompt.prompt_ids, client_id,
                             on_finish=lambda cid=client_id, c=cancel: self.live.close(cid, c),
                             timing={"parse": (parsed - started) * 1e3, "started": started} if STAGE_TIMING else None)
            if cancel.is_set:                     # its client left while it was in an earlier step
                stream.on_output(RequestOutput(client_id, [], "", True, "abort", len(prompt.prompt_ids), 0, 0))
                continue
            rid = f"{client_id or 'req'}-{uuid.uuid4().hex[:12]}"
            self.loop.submit(rid, prompt, params, stream.on_output, sender.is_cancelled, vision)
            cancel.on_cancel(lambda rid=rid: self.loop.cancel(rid))
        return None

    def finalize(self):
        self.loop.shutdown()


def _flag(request, name) -> bool:
    t = pb_utils.get_input_tensor_by_name(request, name)
    return t is not None and t.as_numpy().size > 0 and bool(t.as_numpy().reshape(-1)[0])


def _parse(request, merge_unit: int, sampling_defaults: dict):
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
    flags = {k: _flag(request, k) for k in ("stream", "exclude_input_in_output", "return_num_input_tokens",
                                  "return_num_output_tokens")}
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


class _Stream:
    def __init__(self, sender, flags, tokenizer, prompt_ids, client_id, on_finish, timing=None):
        """`timing` (QWEN3VL_STAGE_TIMING): {"parse": ms, "started": execute's time.monotonic()};
        the first output logs a stage line with both and the engine's share up to it."""
        self.sender, self.flags, self.on_finish, self.timing = sender, flags, on_finish, timing
        self.tokenizer, self.prompt_ids, self.client_id = tokenizer, prompt_ids, client_id
        self.text = ""
        self.logprobs = []                # of tokens not yet sent (a response may carry no text)
        self.prompt_logprobs = None       # sent with the next response

    def on_output(self, out):
        if self.timing is not None:         # the first output: where this request's time to it went
            started = self.timing.pop("started")
            pb_utils.Logger.log_info(f"stage llm {self.client_id}: {stage_line(self.timing, started)}")
            self.timing = None
        if isinstance(out, Exception) or out.finished:
            self.on_finish()
        if isinstance(out, Exception):
            self.sender.send(error_response(pb_utils, out, "llm", self.client_id), flags=FINAL)
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
        tensors = [pb_utils.Tensor("text_output", np.array([text.encode()], dtype=np.object_)),
                   pb_utils.Tensor("finish_reason", np.array([(out.finish_reason or "").encode()], dtype=np.object_))]
        if self.flags["return_num_input_tokens"]:
            tensors.append(pb_utils.Tensor("num_input_tokens", np.array([out.num_prompt_tokens], np.uint32)))
            tensors.append(pb_utils.Tensor("num_cached_tokens", np.array([out.cached_tokens], np.uint32)))
        if self.flags["return_num_output_tokens"]:
            tensors.append(pb_utils.Tensor("num_output_tokens", np.array([out.num_output_tokens], np.uint32)))
        if self.logprobs:
            tensors.append(pb_utils.Tensor("logprobs", np.array([json.dumps(self.logprobs).encode()], dtype=np.object_)))
            self.logprobs = []
        if self.prompt_logprobs is not None:
            tensors.append(pb_utils.Tensor("prompt_logprobs", np.array([json.dumps(self.prompt_logprobs).encode()],
                                                                       dtype=np.object_)))
            self.prompt_logprobs = None
        return pb_utils.InferenceResponse(tensors)
