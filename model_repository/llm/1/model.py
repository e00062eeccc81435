"""Triton `llm` (decoupled): owns the engine and streams tokens.

`execute` converts a request's tensors and hands it to the engine loop thread; responses go
back through the request's sender as the engine produces them: one per text delta when
`stream` is set, else one final response with the whole text.
"""

import uuid

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from qwen3vl_backend.config import EngineConfig
from qwen3vl_backend.engine.llm_engine import LLMEngine
from qwen3vl_backend.processing.processor import ProcessedPrompt
from qwen3vl_backend.sampling_params import SamplingParams
from qwen3vl_backend.serving.engine_loop import EngineLoop
from qwen3vl_backend.serving.preprocess import parse_json_object
from qwen3vl_backend.serving.triton_params import client_error_message, model_settings

# TRITONSERVER_RESPONSE_COMPLETE_FINAL; the stub defines its pb_utils name only at run time
FINAL = 1
ENGINE_KEYS = ("model_path", "device", "dtype", "load_format", "max_model_len", "block_size", "num_kv_blocks",
               "mem_fraction_static", "max_num_seqs", "max_num_batched_tokens", "enable_prefix_cache",
               "attention_backend", "seed")


class TritonPythonModel:
    def initialize(self, args):
        s = model_settings(args)
        self.engine = LLMEngine(EngineConfig.from_settings({k: v for k, v in s.items() if k in ENGINE_KEYS}))
        self.loop = EngineLoop(self.engine)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                prompt, vision, params, flags = _parse(request)
            except ValueError as e:
                sender.send(_error(e), flags=FINAL)
                continue
            rid = request.request_id() or uuid.uuid4().hex
            stream = _Stream(sender, flags, self.engine.tokenizer, prompt.prompt_ids)
            self.loop.submit(f"{rid}-{uuid.uuid4().hex[:8]}", prompt, params, stream.on_output,
                             sender.is_cancelled, vision)
        return None

    def finalize(self):
        self.loop.shutdown()


def _parse(request):
    def get(name):
        t = pb_utils.get_input_tensor_by_name(request, name)
        return None if t is None else t.as_numpy()

    def flag(name, default=False):
        v = get(name)
        return bool(v.reshape(-1)[0]) if v is not None and v.size else default

    ids = get("input_ids").reshape(-1).astype(np.int64).tolist()
    pos = get("positions")
    delta = get("rope_delta")
    positions = torch.from_numpy(pos.reshape(3, -1).astype(np.int64)) if pos is not None else \
        torch.arange(len(ids)).expand(3, -1)
    if positions.shape[1] != len(ids):
        raise ValueError(f"positions cover {positions.shape[1]} tokens, input_ids has {len(ids)}")
    prompt = ProcessedPrompt(ids, [], positions, int(delta.reshape(-1)[0]) if delta is not None else 0)
    embeds, deepstack = get("visual_embeds"), get("deepstack")
    vision = None
    if embeds is not None and embeds.shape[0] > 0:
        ds = [] if deepstack is None else [torch.from_numpy(np.ascontiguousarray(d)) for d in deepstack]
        vision = (torch.from_numpy(np.ascontiguousarray(embeds)), ds)
    raw = get("sampling_parameters")
    text = raw.reshape(-1)[0] if raw is not None and raw.size else b""
    params = SamplingParams.from_dict(parse_json_object(text.decode() if isinstance(text, bytes) else text,
                                                        "sampling_parameters"))
    flags = {k: flag(k) for k in ("stream", "exclude_input_in_output", "return_num_input_tokens",
                                  "return_num_output_tokens")}
    return prompt, vision, params, flags


def _error(e: Exception):
    if isinstance(e, ValueError):       # refused input: prompt too long, bad sampling or features
        return pb_utils.InferenceResponse(
            error=pb_utils.TritonError(client_error_message(e), pb_utils.TritonError.INVALID_ARG))
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e), pb_utils.TritonError.INTERNAL))


class _Stream:
    def __init__(self, sender, flags, tokenizer, prompt_ids):
        self.sender, self.flags = sender, flags
        self.tokenizer, self.prompt_ids = tokenizer, prompt_ids
        self.text = ""

    def on_output(self, out):
        if isinstance(out, Exception):
            self.sender.send(_error(out), flags=FINAL)
            return
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
        return pb_utils.InferenceResponse(tensors)
