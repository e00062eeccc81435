"""CUDA graphs for the ViT, bucketed by patch count (`enable_vit_cuda_graph`).

The shape-dependent preparation (patch embedding, resampled position embeddings, rotary tables,
frame offsets) runs eagerly; the blocks, merger and DeepStack mergers replay from a graph
captured for the smallest bucket that holds the batch's patches. Padding rows are zeros and
form one extra attention segment of their own, so they never mix with real patches; their
outputs are dropped. Attention inside the graphs is the Triton varlen kernel over a fixed-size
segment table: segments past the real ones are empty and their programs return at once.
A batch with more patches than the largest bucket, or more frames than the table holds, runs
eagerly. The buckets stop at 1024 patches (a 448x448 image is 784): there launches dominate and a
replay saves a third of the ViT's time (H200); a 1280x720 image (3520 patches) is compute-bound,
and SDPA's flash kernel beats our varlen kernel on it (18 ms eager against 52 ms in a graph). Without `capture` (CPU) the padded computation runs eagerly: tests check it there.
"""

from __future__ import annotations

import torch

from kernels.varlen_attention import varlen_attention_bounded

DEFAULT_BUCKETS = (256, 512, 1024)
MAX_SEGMENTS = 64


class VisionGraphs:
    def __init__(self, visual, buckets=DEFAULT_BUCKETS, max_segments: int = MAX_SEGMENTS):
        self.visual = visual
        unit = visual.merge ** 2
        self.buckets = sorted(b for b in buckets if b % unit == 0)
        self.max_segments = max_segments
        w = visual.patch_embed.proj.weight
        n, cfg = self.buckets[-1], visual.cfg
        self.x = torch.zeros(n, cfg.hidden_size, dtype=w.dtype, device=w.device)
        self.cos = torch.zeros(n, cfg.head_dim, dtype=torch.float32, device=w.device)
        self.sin = torch.zeros_like(self.cos)
        self.cu = torch.zeros(max_segments + 1, dtype=torch.int32, device=w.device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple]] = {}

    @torch.no_grad()
    def capture(self) -> None:
        pool = None
        for b in reversed(self.buckets):             # largest first: the smaller ones share its pool
            self.cu.copy_(torch.tensor(self._offsets([0, b], b), dtype=torch.int32))
            run = self._encoder(b)
            for _ in range(2):
                run()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                outputs = run()
            pool = graph.pool()
            self.graphs[b] = (graph, outputs)
        torch.cuda.synchronize()

    def _encoder(self, b: int):
        scale = self.visual.cfg.head_dim ** -0.5

        def attn(q, k, v, cu, _scale):
            return varlen_attention_bounded(q, k, v, self.cu, b, scale)

        return lambda: self.visual.encode(self.x[:b], self.cos[:b], self.sin[:b], None, attn)

    def _offsets(self, cu: list[int], b: int) -> list[int]:
        """Real frame offsets, then the padding segment up to b, then empty segments."""
        out = list(cu) + ([b] if cu[-1] < b else [])
        return out + [b] * (self.max_segments + 1 - len(out))

    def fits(self, num_patches: int, num_segments: int) -> bool:
        return num_patches <= self.buckets[-1] and num_segments + 1 <= self.max_segments

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor, grid_thw):
        """Same contract as VisionModel.forward; eager when the batch does not fit a graph."""
        x, cos, sin, cu = self.visual.prepare(pixel_values, grid_thw)
        n = x.shape[0]
        if not self.fits(n, len(cu) - 1):
            return self.visual.encode(x, cos, sin, cu, self.visual.attn_fn)
        b = next(s for s in self.buckets if s >= n)
        self.x[:n].copy_(x)
        self.x[n:b].zero_()
        self.cos[:n].copy_(cos)
        self.sin[:n].copy_(sin)
        self.cu.copy_(torch.tensor(self._offsets(cu, b), dtype=torch.int32), non_blocking=True)
        if b in self.graphs:
            graph, (embeds, deepstack) = self.graphs[b]
            graph.replay()
        else:                        # not captured (CPU tests): the same padded computation, eagerly
            embeds, deepstack = self._encoder(b)()
        rows = n // self.visual.merge ** 2
        return embeds[:rows].clone(), [d[:rows].clone() for d in deepstack]
