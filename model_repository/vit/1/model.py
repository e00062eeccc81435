"""Triton `vit`: pixels of a request's media -> visual embeddings and DeepStack features.

Passes through (empty outputs) when the request has no media.
"""

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from qwen3vl_backend.config import EngineConfig
from qwen3vl_backend.loader import load_model
from qwen3vl_backend.serving.triton_params import model_settings, pick


class TritonPythonModel:
    def initialize(self, args):
        s = model_settings(args)
        cfg = EngineConfig.from_settings(pick(s, ("model_path", "device", "dtype", "load_format")))
        self.device, self.dtype = torch.device(cfg.device), cfg.torch_dtype
        self.model = load_model(cfg.model_path, self.device, self.dtype, cfg.load_format)
        self.out_dim = self.model.cfg.vision.out_hidden_size
        self.levels = len(self.model.cfg.vision.deepstack_visual_indexes)

    def execute(self, requests):
        return [self._one(r) for r in requests]

    @torch.no_grad()
    def _one(self, request):
        pixels = pb_utils.get_input_tensor_by_name(request, "pixel_values").as_numpy()
        grids = pb_utils.get_input_tensor_by_name(request, "grid_thw").as_numpy().reshape(-1, 3)
        if grids.shape[0] == 0:
            embeds = np.zeros((0, self.out_dim), np.float32)
            deepstack = np.zeros((self.levels, 0, self.out_dim), np.float32)
        else:
            pv = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device, self.dtype)
            e, ds = self.model.visual(pv, [tuple(int(x) for x in g) for g in grids])
            embeds = e.float().cpu().numpy()
            deepstack = torch.stack(ds).float().cpu().numpy()
        return pb_utils.InferenceResponse([pb_utils.Tensor("visual_embeds", embeds),
                                           pb_utils.Tensor("deepstack", deepstack)])
