"""Qwen3-VL top level: `model.visual`, `model.language_model`, `lm_head`, named as in the checkpoint.

`forward` runs the decoder on one step's flat batch. Vision features come in precomputed
(the ViT runs once per media item, possibly in another Triton model): `visual_embeds`
(Nv, D) replace the embeddings where `visual_mask` (T,) is set, and `deepstack[i]` (Nv, D) is
added after decoder layer i at the same positions. `dense_visual` (CUDA graphs: no shape may
depend on the mask) takes them as (T, D) rows instead, zero where the mask is not set, merged
without indexing by the mask; every row comes out the same (x + 0 == x).
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers.linear import ParallelLMHead
from ..layers.rotary import mrope_axis_map, mrope_cos_sin, rope_inv_freq
from ..model_config import ModelConfig
from ..parallel import Parallel
from .text import TextModel
from .vision import VisionModel


class Qwen3VLForConditionalGeneration(nn.Module):
    def __init__(self, cfg: ModelConfig, par: Parallel = Parallel()):
        super().__init__()
        self.cfg, self.par = cfg, par
        t = cfg.text
        self.model = nn.Module()
        # the vision tower runs on rank 0 only: the other tensor-parallel ranks do not hold it
        self.model.visual = VisionModel(cfg.vision) if par.tp_rank == 0 else None
        self.model.language_model = TextModel(t, cfg.quant, par)
        self.lm_head = ParallelLMHead(t.vocab_size, t.hidden_size, par.tp_size, par.tp_rank)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight
        # float32 and kept off the module's buffers, so a cast to bf16 cannot round them
        self._rope_tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.rope_fn = mrope_cos_sin     # qwen3vl_kernels.rope.mrope_cos_sin on a GPU (engine.model_runner.select_kernels)

    @property
    def visual(self) -> VisionModel:
        return self.model.visual

    def forward(self, input_ids, positions, kv_caches, meta, visual_embeds=None, visual_mask=None,
                deepstack=(), dense_visual: bool = False):
        """input_ids (T,), positions (3, T) -> final hidden states (T, D)."""
        lm = self.model.language_model
        embeds = lm.embed_tokens(input_ids)
        if dense_visual:
            embeds = torch.where(visual_mask[:, None], visual_embeds.to(embeds.dtype), embeds)
        elif visual_embeds is not None and visual_embeds.shape[0]:
            embeds = embeds.index_put((visual_mask,), visual_embeds.to(embeds.dtype))
        else:
            deepstack = ()
        cos, sin = self.rope_fn(positions, *self._rope(positions.device))
        return lm(embeds, cos, sin, kv_caches, meta, visual_mask, deepstack, dense_visual)

    def _rope(self, device):
        if device not in self._rope_tables:
            t = self.cfg.text
            self._rope_tables[device] = (
                rope_inv_freq(t.head_dim, t.rope_theta).to(device),
                mrope_axis_map(t.head_dim // 2, t.mrope_section, t.mrope_interleaved).to(device),
            )
        return self._rope_tables[device]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
