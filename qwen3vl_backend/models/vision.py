"""Qwen3-VL vision encoder: patches -> ViT blocks -> 2x2 merger, plus DeepStack features.

Shapes: N = patches of all images/videos in the batch (packed), C = 3 * Tp * P * P flattened
patch, Dv = vision hidden, Do = decoder hidden, M = merge unit (spatial_merge_size ** 2).
Patches arrive in merge-block order (the processor's layout), so every M consecutive patches
form one output token. Attention is bidirectional within a frame (one segment per t of each
grid); learned position embeddings are bilinearly resampled from a square table to each grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.attention import varlen_attention_torch
from ..layers.rotary import apply_rotary, vision_rope_cos_sin
from ..model_config import VisionConfig


TABLES_KEPT = 16                # grids whose tables VisionModel.tables keeps
TABLES_MAX_PATCHES = 16384      # larger batches (long videos) are not kept: ~10 MB of tables each


def grids_key(grid_thw) -> tuple:
    """A batch's grids as a hashable key (tables and graphs kept per grid list)."""
    return tuple(tuple(int(v) for v in g) for g in grid_thw)


class PatchEmbed(nn.Module):
    def __init__(self, in_channels: int, temporal_patch: int, patch: int, dim: int):
        super().__init__()
        # Conv3d weight shape, as in the checkpoint; stride == kernel so it is one matmul.
        self.proj = nn.Conv3d(in_channels, dim, (temporal_patch, patch, patch),
                              stride=(temporal_patch, patch, patch), bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:                      # (N, C) -> (N, Dv)
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.flatten(1), self.proj.bias)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x, cos, sin, cu_seqlens, attn_fn):
        n = x.shape[0]
        qkv = self.qkv(x)
        if qkv.is_cuda:         # one kernel; q, k, v come heads-major, as attention reads them
            from qwen3vl_kernels.rope import vision_rotary

            q, k, v = vision_rotary(qkv, cos, sin, self.num_heads)
        else:
            q, k, v = qkv.view(n, 3, self.num_heads, self.head_dim).unbind(1)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = attn_fn(q, k, v, cu_seqlens, self.head_dim ** -0.5)
        return self.proj(o.reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear_fc1 = nn.Linear(dim, hidden, bias=True)
        self.linear_fc2 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x):
        if x.is_cuda and x.dim() == 2 and self.linear_fc1.bias is not None:
            from qwen3vl_kernels import switches

            if switches.VIT_GELU_EPILOGUE:      # the tanh GELU in cuBLASLt's epilogue: one pass fewer
                return self.linear_fc2(torch._addmm_activation(self.linear_fc1.bias, x, self.linear_fc1.weight.t(),
                                                               use_gelu=True))
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = VisionAttention(dim, num_heads)
        self.mlp = VisionMLP(dim, mlp_hidden)

    def forward(self, x, cos, sin, cu_seqlens, attn_fn):
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens, attn_fn)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """M patches -> one decoder token. DeepStack mergers normalise after the shuffle."""

    def __init__(self, dim: int, out_dim: int, merge_unit: int, postshuffle_norm: bool):
        super().__init__()
        self.merged = dim * merge_unit
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(self.merged if postshuffle_norm else dim, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.merged, self.merged)
        self.linear_fc2 = nn.Linear(self.merged, out_dim)

    def forward(self, x):
        x = self.norm(x.view(-1, self.merged)) if self.postshuffle_norm else self.norm(x).view(-1, self.merged)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class VisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.merge = cfg.spatial_merge_size
        self.patch_embed = PatchEmbed(cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.hidden_size)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.grid_side = int(cfg.num_position_embeddings ** 0.5)
        self.blocks = nn.ModuleList(
            VisionBlock(cfg.hidden_size, cfg.num_heads, cfg.intermediate_size) for _ in range(cfg.depth)
        )
        unit = self.merge ** 2
        self.merger = PatchMerger(cfg.hidden_size, cfg.out_hidden_size, unit, postshuffle_norm=False)
        self.deepstack_merger_list = nn.ModuleList(
            PatchMerger(cfg.hidden_size, cfg.out_hidden_size, unit, postshuffle_norm=True)
            for _ in cfg.deepstack_visual_indexes
        )
        self.attn_fn = varlen_attention_torch
        self._tables: dict = {}

    def forward(self, pixel_values: torch.Tensor, grid_thw: list[tuple[int, int, int]]):
        """pixel_values (N, C), grid_thw per item -> embeds (N/M, Do), deepstack [(N/M, Do)] * levels."""
        return self.encode(*self.prepare(pixel_values, grid_thw), self.attn_fn)

    def prepare(self, pixel_values: torch.Tensor, grid_thw: list[tuple[int, int, int]]):
        """The shape-dependent part: patch embedding with resampled positions, rotary tables and the
        frames' segment offsets -> x (N, Dv), cos, sin (N, head_dim), cu_seqlens (list)."""
        idx, w, cos, sin, cu = self.tables(grid_thw, pixel_values.device)
        return self.embed(pixel_values, idx, w), cos, sin, cu

    def embed(self, pixel_values, idx, w):
        x = self.patch_embed(pixel_values)
        return x + (self.pos_embed(idx) * w[..., None]).sum(1).to(x.dtype)

    def tables(self, grid_thw, dev):
        """What depends only on the grids: position-table taps and weights (N, 4), rotary cos/sin
        (N, head_dim), segment offsets. Some forty small launches; the last few grids' are kept
        (a server sees the same image sizes again and again)."""
        key = (grids_key(grid_thw), str(dev))
        hit = self._tables.pop(key, None)
        if hit is None:
            idx, w = self._pos_interp(grid_thw, dev)
            cos, sin = vision_rope_cos_sin(self._hw_positions(grid_thw, dev), self.cfg.head_dim, self.cfg.rope_theta)
            cu = [0]
            for t, h, wd in grid_thw:
                base = cu[-1]
                cu.extend(base + h * wd * (i + 1) for i in range(t))
            hit = (idx, w, cos, sin, cu)
        if hit[0].shape[0] <= TABLES_MAX_PATCHES:
            while len(self._tables) >= TABLES_KEPT:     # a hit was popped above: nothing goes for it
                self._tables.pop(next(iter(self._tables)))
            self._tables[key] = hit                 # most recent last
        return hit

    def encode(self, x, cos, sin, cu, attn_fn):
        """Blocks, merger and DeepStack mergers: what the ViT CUDA graphs capture."""
        if x.is_cuda and x.dim() == 2:
            from qwen3vl_kernels import switches

            if switches.VIT_FUSED_NORM:
                return self._encode_fused_norms(x, cos, sin, cu, attn_fn)
        deepstack = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, cu, attn_fn)
            if i in self.cfg.deepstack_visual_indexes:
                deepstack.append(self.deepstack_merger_list[self.cfg.deepstack_visual_indexes.index(i)](x))
        return self.merger(x), deepstack

    def _encode_fused_norms(self, x, cos, sin, cu, attn_fn):
        """encode with each residual add and the LayerNorm after it in one launch
        (qwen3vl_kernels.layernorm.add_layer_norm): the stream it writes is PyTorch's add's, bit for bit."""
        from qwen3vl_kernels.layernorm import add_layer_norm

        def norm(s, delta, ln):
            return add_layer_norm(s, delta, ln.weight, ln.bias, ln.eps)

        deepstack, blocks = [], self.blocks
        h, _ = norm(x, None, blocks[0].norm1)
        for i, blk in enumerate(blocks):
            h, x = norm(x, blk.attn(h, cos, sin, cu, attn_fn), blk.norm2)
            m = blk.mlp(h)
            if i + 1 < len(blocks):
                h, x = norm(x, m, blocks[i + 1].norm1)
            else:
                x = x + m
            if i in self.cfg.deepstack_visual_indexes:
                deepstack.append(self.deepstack_merger_list[self.cfg.deepstack_visual_indexes.index(i)](x))
        return self.merger(x), deepstack

    def _merge_order(self, h: int, w: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column of each patch of an h x w frame, in merge-block order."""
        m = self.merge
        rows = torch.arange(h, device=dev).view(h // m, m, 1, 1).expand(h // m, m, w // m, m)
        cols = torch.arange(w, device=dev).view(1, 1, w // m, m).expand(h // m, m, w // m, m)
        return rows.permute(0, 2, 1, 3).flatten(), cols.permute(0, 2, 1, 3).flatten()

    def _hw_positions(self, grid_thw, dev) -> torch.Tensor:
        out = []
        for t, h, w in grid_thw:
            r, c = self._merge_order(h, w, dev)
            out.append(torch.stack((r, c), -1).repeat(t, 1))
        return torch.cat(out)

    def _pos_interp(self, grid_thw, dev):
        """Bilinear (align_corners) taps into the square table: indices and weights (N, 4)."""
        side = self.grid_side
        idx_all, w_all = [], []
        for t, h, w in grid_thw:
            r, c = self._merge_order(h, w, dev)
            (r0, r1), (wr0, wr1) = _taps(r, h, side)
            (c0, c1), (wc0, wc1) = _taps(c, w, side)
            idx = torch.stack((r0 * side + c0, r0 * side + c1, r1 * side + c0, r1 * side + c1), -1)
            wt = torch.stack((wr0 * wc0, wr0 * wc1, wr1 * wc0, wr1 * wc1), -1)
            idx_all.append(idx.repeat(t, 1))
            w_all.append(wt.repeat(t, 1))
        return torch.cat(idx_all), torch.cat(w_all)


def _taps(index: torch.Tensor, size: int, side: int):
    src = index.float() * (side - 1) / max(size - 1, 1)
    lo = src.floor()
    frac = src - lo
    lo = lo.long()
    return (lo.clamp(0, side - 1), (lo + 1).clamp(0, side - 1)), (1 - frac, frac)
