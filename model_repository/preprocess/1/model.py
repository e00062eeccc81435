"""Triton `preprocess`: request -> token ids, mRoPE positions, pixels.

The work is qwen3vl_backend.serving.preprocess; this file converts tensors and hands off. A
request's media items are fetched and decoded in parallel on the media pool, within its
per-request timeout.

With `use_cuda_ipc_transport` (SGLANG_USE_CUDA_IPC_TRANSPORT=1) and a GPU, pixels are put on the
GPU once here and leave as a CUDA tensor (DLPack); Triton hands it to `vit` through CUDA IPC
instead of a host copy through shared memory.
"""

import base64
import io
import json
import time

import numpy as np
import torch
import torch.utils.dlpack

import triton_python_backend_utils as pb_utils
from PIL import Image

from qwen3vl_backend.processing.chat import MediaRef
from qwen3vl_backend.processing.media import video_backend
from qwen3vl_backend.processing.processor import Processor
from qwen3vl_backend.serving.media_pool import MediaPool
from qwen3vl_backend.serving.preprocess import Preprocessor
from qwen3vl_backend.config import PreprocessConfig
from qwen3vl_backend.serving.triton_params import error_response, model_settings
from qwen3vl_backend.serving.stage_timing import STAGE_TIMING, stage_line

OUTPUTS = {"input_ids": "input_ids", "positions": "positions", "rope_delta": "rope_delta",
           "pixel_values": "pixel_values", "grid_thw": "grid_thw", "media_hashes": "media_hashes",
           "sampling_parameters": "sampling_parameters_out", "source_sizes": "source_sizes",
           "jpeg_bytes": "jpeg_bytes", "jpeg_lengths": "jpeg_lengths"}


class TritonPythonModel:
    def initialize(self, args):
        cfg = PreprocessConfig.from_settings(model_settings(args))
        families = {
            "seconds": pb_utils.MetricFamily("qwen3vl_media_processing_seconds_total",
                                             "Wall time of requests' media work (fetch, decode, process)",
                                             pb_utils.MetricFamily.COUNTER),
            "requests": pb_utils.MetricFamily("qwen3vl_media_requests_total", "Requests with media processed",
                                              pb_utils.MetricFamily.COUNTER)}
        self._families = families
        self.media_seconds = families["seconds"].Metric({})
        self.media_requests = families["requests"].Metric({})
        self.ipc = cfg.use_cuda_ipc_transport and torch.cuda.is_available()
        pool = MediaPool(cfg.mm_max_concurrent_calls, cfg.mm_per_request_timeout)
        self.pre = Preprocessor(Processor(cfg.model_path), cfg.media_policy(), pool, cfg.limits(),
                                raw_frames=cfg.resize_on_vit, encoded_frames=cfg.resize_on_vit and cfg.decode_jpeg_on_vit)
        decoder = video_backend()
        pb_utils.Logger.log_info(f"preprocess: video decoder {decoder}" if decoder else
                                 "preprocess: no video decoder (install decord or PyAV): video requests are refused")
        self._warm_up()

    def _warm_up(self):
        """At load: a request arriving at a fresh instance must not pay for lazy imports, the
        image decoders' first use, the allocator's first megabyte-sized buffers (a first pair of
        1280x720 images took 76 ms here against 35 after, where only a 64x64 warm-up had run) or
        (CUDA IPC) creating the CUDA context. A small request goes the whole way; two photo-sized
        images (PNG, JPEG) go through the media work alone (a small context could not hold them)."""
        pixels = np.random.default_rng(0).integers(0, 256, (720, 1280, 3), dtype=np.uint8)
        refs = [MediaRef("image", _data_uri(Image.fromarray(pixels), fmt)) for fmt in ("PNG", "JPEG")]
        self.pre.pool.run_all(self.pre.processor.media_jobs(refs, self.pre.policy, normalize=False, single_frame=True),
                              None)
        url = _data_uri(Image.new("RGB", (64, 64), (128, 64, 32)), "PNG")
        chat = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": "warm up"}]}]}
        arrays = self.pre.run(json.dumps(chat))
        if self.ipc:
            torch.from_numpy(arrays["pixel_values"]).cuda()
            torch.cuda.synchronize()

    def finalize(self):
        self.pre.pool.shutdown()

    def execute(self, requests):
        return [self._one(r) for r in requests]

    def _one(self, request):
        rid = request.request_id()
        started = time.monotonic()
        images = _strings(request, "image")
        try:
            text = _strings(request, "text_input")
            if not text:
                raise ValueError("text_input is required")
            sampling = _strings(request, "sampling_parameters")
            timing = {} if STAGE_TIMING else None
            arrays = self.pre.run(text[0], images, sampling[0] if sampling else "", timing=timing,
                                  media=_strings(request, "media"))
            if arrays["grid_thw"].size:
                self.media_seconds.increment(time.monotonic() - started)
                self.media_requests.increment(1)
            response = pb_utils.InferenceResponse([self._tensor(OUTPUTS[k], v) for k, v in arrays.items()])
            if timing is not None:
                pb_utils.Logger.log_info(f"stage preprocess {rid}: {stage_line(timing, started)}")
            return response
        except Exception as e:      # a client mistake (400) or a fault (500): either way this request's alone
            return error_response(pb_utils, e, "preprocess", rid)

    def _tensor(self, name, array):
        if self.ipc and name == "pixel_values" and array.size:
            return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(torch.from_numpy(array).cuda()))
        return pb_utils.Tensor(name, array)


def _data_uri(image, fmt: str) -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def _strings(request, name):
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return []
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in t.as_numpy().reshape(-1)]
