"""Triton `llm` (decoupled): owns the engine and streams tokens.

`execute` converts a request's tensors and hands it to the engine loop thread; responses go
back through the request's sender as the engine produces them: one per text delta when
`stream` is set, else one final response with the whole text. Reading the request and sending
the responses live in qwen3vl_backend/serving/llm_requests.py, tested without tritonserver.
"""

import time
import uuid

import triton_python_backend_utils as pb_utils

from qwen3vl_backend.config import EngineConfig
from qwen3vl_backend.engine.llm_engine import LLMEngine, RequestOutput
from qwen3vl_backend.serving.cancel import CancelRegistry
from qwen3vl_backend.serving.engine_loop import EngineLoop
from qwen3vl_backend.serving.llm_requests import FINAL, ResponseStream, flag, parse_request
from qwen3vl_backend.serving.stage_timing import STAGE_TIMING
from qwen3vl_backend.serving.triton_metrics import TritonEngineMetrics
from qwen3vl_backend.serving.triton_params import error_response, model_settings

class TritonPythonModel:
    def initialize(self, args):
        # every parameter is an engine setting: a misspelt one fails the load, naming it
        self.engine = LLMEngine(EngineConfig.from_settings(model_settings(args)))
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
            if flag(pb_utils, request, "cancel"):
                self.live.cancel(client_id)
                sender.send(flags=FINAL)
                continue
            try:
                prompt, vision, params, flags = parse_request(pb_utils, request, self.merge_unit,
                                                              self.engine.sampling_defaults)
                if vision is not None:
                    self._arrived[1][vision[0].is_cuda].increment(1)
            except Exception as e:
                sender.send(error_response(pb_utils, e, "llm", client_id), flags=FINAL)
                continue
            parsed = time.monotonic()
            cancel = self.live.open(client_id)
            stream = ResponseStream(pb_utils, sender, flags, self.engine.tokenizer, prompt.prompt_ids, client_id,
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
