"""Triton `preprocess`: request -> token ids, mRoPE positions, pixels (qwen3vl_backend.serving.preprocess).

With `use_cuda_ipc_transport` (SGLANG_USE_CUDA_IPC_TRANSPORT=1) and a GPU, pixels are put on the
GPU once here and leave as a CUDA tensor (DLPack); Triton hands it to `vit` through CUDA IPC
instead of a host copy through shared memory.
"""

import base64
import io
import json
import time

import torch
import torch.utils.dlpack

import triton_python_backend_utils as pb_utils
from PIL import Image

from qwen3vl_backend.processing.chat import RequestError
from qwen3vl_backend.processing.media import MediaPolicy
from qwen3vl_backend.processing.processor import Processor
from qwen3vl_backend.sampling_params import SamplingError
from qwen3vl_backend.serving.media_pool import MediaPool
from qwen3vl_backend.serving.preprocess import preprocess
from qwen3vl_backend.serving.triton_params import client_error_message, model_settings

OUTPUTS = {"input_ids": "input_ids", "positions": "positions", "rope_delta": "rope_delta",
           "pixel_values": "pixel_values", "grid_thw": "grid_thw", "media_hashes": "media_hashes",
           "sampling_parameters": "sampling_parameters_out"}


class TritonPythonModel:
    def initialize(self, args):
        s = model_settings(args)
        self.processor = Processor(s["model_path"])
        self.policy = MediaPolicy(allowed_local_dir=s.get("allowed_local_media_path") or None,
                                  fetch_timeout_s=float(s.get("media_fetch_timeout_s", "10")))
        self._families = {
            "seconds": pb_utils.MetricFamily("qwen3vl_media_processing_seconds_total",
                                             "Wall time of requests' media work (fetch, decode, process)",
                                             pb_utils.MetricFamily.COUNTER),
            "requests": pb_utils.MetricFamily("qwen3vl_media_requests_total", "Requests with media processed",
                                              pb_utils.MetricFamily.COUNTER)}
        self.media_seconds = self._families["seconds"].Metric({})
        self.media_requests = self._families["requests"].Metric({})
        self.ipc = s.get("use_cuda_ipc_transport", "0").lower() in ("1", "true") and torch.cuda.is_available()
        self.pool = MediaPool(int(s.get("mm_max_concurrent_calls", "32")), float(s.get("mm_per_request_timeout", "10")))
        self._warm_up()

    def _warm_up(self):
        """One small image request at load: a request arriving at a fresh instance must not pay for
        lazy imports, the image decoders' first use or (CUDA IPC) creating the CUDA context."""
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (128, 64, 32)).save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        chat = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": "warm up"}]}]}
        arrays = preprocess(self.processor, json.dumps(chat), [], "", self.policy)
        if self.ipc:
            torch.from_numpy(arrays["pixel_values"]).cuda()
            torch.cuda.synchronize()

    def _timed_media(self, jobs):
        if not jobs:
            return []
        start = time.monotonic()
        try:
            return self.pool.run_all(jobs)
        finally:
            self.media_seconds.increment(time.monotonic() - start)
            self.media_requests.increment(1)

    def finalize(self):
        self.pool.shutdown()

    def execute(self, requests):
        return [self._one(r) for r in requests]

    def _one(self, request):
        try:
            text = _strings(request, "text_input")
            if not text:
                raise RequestError("text_input is required")
            sampling = _strings(request, "sampling_parameters")
            arrays = preprocess(self.processor, text[0], _strings(request, "image"),
                                sampling[0] if sampling else "", self.policy, self._timed_media)
        except (RequestError, SamplingError) as e:
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError(client_error_message(e), pb_utils.TritonError.INVALID_ARG))
        return pb_utils.InferenceResponse([self._tensor(OUTPUTS[k], v) for k, v in arrays.items()])

    def _tensor(self, name, array):
        if self.ipc and name == "pixel_values" and array.size:
            return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(torch.from_numpy(array).cuda()))
        return pb_utils.Tensor(name, array)


def _strings(request, name):
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return []
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in t.as_numpy().reshape(-1)]
