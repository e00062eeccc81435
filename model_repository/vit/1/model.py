"""Triton `vit`: pixels of a request's media -> visual embeddings and DeepStack features.

Passes through (empty outputs) when the request has no media.
"""

import functools
import time

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from qwen3vl_backend.config import EngineConfig, parse_bool
from qwen3vl_backend.engine.model_runner import vision_attention
from qwen3vl_backend.engine.vision_graphs import VisionGraphs
from qwen3vl_backend.loader import load_vision_model
from qwen3vl_backend.processing.vision_inputs import (VisionProcessingConfig, check_pixel_rows, expand_image_rows,
                                                       image_grid, normalize_patches, parse_image_sizes,
                                                       raw_frames_to_rows)
from qwen3vl_backend.serving.triton_params import error_response, model_settings, pick
from qwen3vl_backend.serving.stage_timing import PROFILE_AT, PROFILE_DIR, STAGE_TIMING, RequestProfiler, stage_line
from qwen3vl_backend.serving.triton_tensors import as_torch
from qwen3vl_backend.engine.vision_cache import VisionCache, encode_checked
from qwen3vl_backend.serving.vision_split import device_context, encode_split, replica_gpus, warm_exact_grids


class TritonPythonModel:
    def initialize(self, args):
        s = model_settings(args)
        cfg = EngineConfig.from_settings(pick(s, ("model_path", "device", "dtype", "load_format",
                                                  "mm_attention_backend", "enable_vit_cuda_graph")))
        self.device, self.dtype = torch.device(cfg.device), cfg.torch_dtype
        gpus = int(s.get("vit_gpus", "1") or 1)
        devices = [self.device]
        if self.device.type == "cuda" and gpus > 1:
            # --mm-enable-dp-encoder: instance i on GPU i of the group, with a replica on the next,
            # so a request's items are encoded on both (serving/vision_split.py)
            index = int(args["model_instance_name"].rsplit("_", 1)[-1])
            devices = [torch.device(f"cuda:{g}") for g in replica_gpus(index, gpus, cfg.device_index)]
            self.device = devices[0]
            torch.cuda.set_device(self.device)
        self.replicas, self.encoders = [], []
        for device in devices:
            with device_context(device):
                visual = load_vision_model(cfg.model_path, device, self.dtype, cfg.load_format)
                visual.attn_fn = vision_attention(cfg.mm_attention_backend)
                encoder = visual
                if cfg.enable_vit_cuda_graph and device.type == "cuda":
                    encoder = VisionGraphs(visual)
                    encoder.capture()
            self.replicas.append((device, functools.partial(self._encode_on, device, encoder)))
            self.encoders.append(encoder)
            if device == self.device:
                self.visual = visual
        self.graphed = [e for e in self.encoders if isinstance(e, VisionGraphs)]
        vcfg = self.visual.cfg
        self.out_dim, self.levels = vcfg.out_hidden_size, len(vcfg.deepstack_visual_indexes)
        self.merge_unit = vcfg.spatial_merge_size ** 2
        self.pixel_cfg = VisionProcessingConfig.from_dir(cfg.model_path)   # pixels arrive as uint8 patches
        # --keep-mm-feature-on-device: outputs leave as CUDA tensors (DLPack), never copied to host
        self.on_device = parse_bool(s.get("keep_mm_feature_on_device", "false")) and self.device.type == "cuda"
        # features kept on a GPU land on the group's first, where the llm's rank 0 reads them
        # (Triton's CUDA memory pool, which carries them between models, is on that GPU only)
        self.out_device = torch.device(f"cuda:{cfg.device_index}") if self.on_device else self.device
        self.cache = VisionCache(float(s.get("vlm_cache_size_mb", "0") or 0))
        family = pb_utils.MetricFamily("qwen3vl_vit_cache_total", "ViT embedding cache lookups by result",
                                       pb_utils.MetricFamily.COUNTER)
        self._metrics = (family, family.Metric({"result": "hit"}), family.Metric({"result": "miss"}))
        arrived = pb_utils.MetricFamily("qwen3vl_vit_pixels_total", "Requests' pixels by where they arrived (gpu: "
                                        "CUDA IPC transport, host: shared memory)", pb_utils.MetricFamily.COUNTER)
        self._arrived = (arrived, {True: arrived.Metric({"where": "gpu"}), False: arrived.Metric({"where": "host"})})
        self._timing, self._profiler = None, RequestProfiler(PROFILE_DIR, "vit", at=PROFILE_AT)
        # --vit-warmup-sizes: images whose exact-grid graphs each replica captures before requests
        self.warm_sizes = parse_image_sizes(s.get("vit_warmup_sizes", ""))
        self.warm_grids = [image_grid(w, h, self.pixel_cfg) for w, h in self.warm_sizes]
        self.warm_up()

    @torch.no_grad()
    def warm_up(self):
        """Before the first request, encode what requests will: a 448x448 image (inside the graph
        buckets) on each replica, then on a GPU, as a request runs it (single-frame rows, split over
        the replicas when there are several), images past the buckets three times: eagerly, captured
        as an exact grid, replayed. The encoder's first calls compile and plan their kernels (0.4 s
        of one request's TTFT on an H200). The warm-up's own grid is forgotten after, so it holds
        no graph a request will not use. Served 235B-A22B, the first four of eight requests' ViT:
        73-118 ms without the large images (dad9405), 66-77 with them (c2fa3c4), 21-33 for the
        rest. What stays cold is SDPA's cuDNN attention, which plans each new sequence length at
        first sight (~65 ms), and a grid's exact capture on its second arrival (~20 ms):
        benchmarks/results/NOTES.md, tenth session. The stage lines then showed each instance
        meeting 1280x720 first eagerly and then capturing it (twelfth session), so the sizes of
        `warm_grids` (--vit-warmup-sizes) are met here, one image a replica as a request of one
        or two brings them, three times each (planned, captured, replayed), and kept."""
        small, large = (1, 28, 28), (1, 48, 48)
        for device, encode in self.replicas:
            with device_context(device):
                encode(torch.zeros(small[1] * small[2], self.pixel_cfg.patch_width, dtype=torch.uint8), [small])
        if self.device.type != "cuda":          # no graphs, no planning on a CPU: nothing more to warm
            return
        frame = self.pixel_cfg.patch_width // self.pixel_cfg.temporal_patch_size
        grids = [large] * len(self.replicas)
        for _ in range(3):
            self._encode(torch.zeros(sum(g[1] * g[2] for g in grids), frame, dtype=torch.uint8,
                                     device=self.device), grids)
        for device, _ in self.replicas:
            torch.cuda.synchronize(device)
        for encoder in self.graphed:
            encoder.forget_grids()
        if self.graphed:
            warm_exact_grids(self.replicas, self.warm_grids, frame)
        for (w, h), grid in zip(self.warm_sizes, self.warm_grids):      # their resize's taps, made once
            raw_frames_to_rows(torch.zeros(w * h, 3, dtype=torch.uint8), [(h, w)], [grid], self.pixel_cfg, self.device)
            # and the JPEG decoder (nvJPEG's library, handle and buffers) as a JPEG sent undecoded meets it
            jpeg = _jpeg_of(w, h)
            raw_frames_to_rows(torch.zeros(0, 3, dtype=torch.uint8), [(h, w)], [grid], self.pixel_cfg, self.device,
                               (np.frombuffer(jpeg, np.uint8), [len(jpeg)]))
        torch.cuda.synchronize(self.device)

    def _paths(self) -> str:
        """Each replica's GPU and how it ran this request (engine.vision_graphs' last_path, reset
        before the request: "-" where it encoded nothing; "eager" without graphs), e.g.
        "0:replay,1:first": which instance and replica met a grid cold."""
        def path(encoder):
            if not isinstance(encoder, VisionGraphs):
                return "eager"
            return encoder.last_path or "-"
        return ",".join(f"{device.index if device.index is not None else device.type}:{path(encoder)}"
                        for (device, _), encoder in zip(self.replicas, self.encoders))

    def execute(self, requests):
        return [self._one(r) for r in requests]

    def _encode(self, pixels, grids):
        """All items, over the replicas' GPUs when there are several; the outputs on `out_device`."""
        return encode_split(self.replicas, pixels, grids, self.out_device)

    def _encode_on(self, device, encoder, pixels, grids):
        x = normalize_patches(pixels.to(device), self.pixel_cfg)
        if x.shape[1] != self.pixel_cfg.patch_width:        # images only, each frame sent once
            x = expand_image_rows(x, self.pixel_cfg)
        return encoder(x.to(self.dtype), grids)

    @torch.no_grad()
    def _one(self, request):
        started = time.monotonic()
        try:
            with self._profiler(request.request_id()):
                response = self._respond(request)
        except Exception as e:      # a caller's bad tensors (400) or a fault (500): this request's alone
            return error_response(pb_utils, e, "vit", request.request_id())
        if self._timing is not None:
            self._timing["respond"] = (time.monotonic() - started) * 1e3
            pb_utils.Logger.log_info(f"stage vit {request.request_id()}: {stage_line(self._timing)}")
        return response

    def _respond(self, request):
        timing = self._timing = {} if STAGE_TIMING else None
        t0 = time.perf_counter()
        # on the GPU when preprocess sent it by CUDA IPC
        pixels = as_torch(pb_utils.get_input_tensor_by_name(request, "pixel_values"))
        if pixels.numel():
            self._arrived[1][pixels.is_cuda].increment(1)
        grids = as_torch(pb_utils.get_input_tensor_by_name(request, "grid_thw")).cpu().numpy().reshape(-1, 3)
        sizes = pb_utils.get_input_tensor_by_name(request, "source_sizes")
        sizes = np.zeros((0, 2), np.int64) if sizes is None else as_torch(sizes).cpu().numpy().reshape(-1, 2)
        checks = []         # JPEGs decoded by nvJPEG: is each intact (jpeg_gpu.intact)? (item, Future)
        if len(sizes):      # images sent unresized (JPEGs among them undecoded): decoded, resized here, on this model's device
            jpegs, lengths = (pb_utils.get_input_tensor_by_name(request, k) for k in ("jpeg_bytes", "jpeg_lengths"))
            encoded = None if lengths is None else (
                np.empty(0, np.uint8) if jpegs is None else as_torch(jpegs).cpu().numpy().reshape(-1),
                as_torch(lengths).cpu().numpy().reshape(-1))
            unresized = pixels
            pixels = raw_frames_to_rows(unresized, sizes, grids, self.pixel_cfg, self.device, encoded, checks)
        check_pixel_rows(tuple(pixels.shape), grids, self.pixel_cfg)
        if grids.shape[0] == 0:
            embeds = np.zeros((0, self.out_dim), np.float32)
            deepstack = np.zeros((self.levels, 0, self.out_dim), np.float32)
        else:
            hashes = pb_utils.get_input_tensor_by_name(request, "media_hashes")
            keys = None if hashes is None else [h.decode() if isinstance(h, bytes) else str(h)
                                                for h in hashes.as_numpy().reshape(-1)]
            pv = pixels.contiguous()
            hits, misses = self.cache.hits, self.cache.misses
            for encoder in self.graphed:        # this request's paths only (stage lines)
                encoder.last_path = None
            t1 = time.perf_counter()
            # a JPEG that libjpeg-turbo warns on (damaged) is encoded again from the host's pixels
            # (its recovery, or its 400) in place of nvJPEG's; the check runs while the GPU encodes
            e, ds = encode_checked(self._encode, self.cache, pv, [tuple(int(x) for x in g) for g in grids], keys,
                                   self.merge_unit, checks, lambda: raw_frames_to_rows(
                                       unresized, sizes, grids, self.pixel_cfg, self.device, encoded,
                                       gpu_decode=False).contiguous())
            if timing is not None:      # the encoder's host time, then its GPU tail
                t2 = time.perf_counter()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                timing.update(inputs=(t1 - t0) * 1e3, queue=(t2 - t1) * 1e3, gpu_tail=(time.perf_counter() - t2) * 1e3,
                              paths=self._paths())
            self._metrics[1].increment(self.cache.hits - hits)
            self._metrics[2].increment(self.cache.misses - misses)
            embeds, deepstack = e.float().contiguous(), torch.stack(ds).float().contiguous()
            if self.on_device:
                return pb_utils.InferenceResponse([
                    pb_utils.Tensor.from_dlpack("visual_embeds", torch.utils.dlpack.to_dlpack(embeds)),
                    pb_utils.Tensor.from_dlpack("deepstack", torch.utils.dlpack.to_dlpack(deepstack))])
            embeds, deepstack = embeds.cpu().numpy(), deepstack.cpu().numpy()
        return pb_utils.InferenceResponse([pb_utils.Tensor("visual_embeds", embeds),
                                           pb_utils.Tensor("deepstack", deepstack)])


def _jpeg_of(width: int, height: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 140, 200)).save(buf, format="JPEG")
    return buf.getvalue()
