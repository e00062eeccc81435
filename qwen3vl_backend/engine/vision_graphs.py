"""CUDA graphs for the ViT, bucketed by patch count (`enable_vit_cuda_graph`).

The shape-dependent preparation (patch embedding, resampled position embeddings, rotary tables,
frame offsets) runs eagerly; the blocks, merger and DeepStack mergers replay from a graph
captured for the smallest bucket that holds the batch's patches. Padding rows are zeros and
form one extra attention segment of their own, so they never mix with real patches; their
outputs are dropped. Attention inside the graphs is the Triton varlen kernel over a fixed-size
segment table: segments past the real ones are empty and their programs return at once.
The buckets stop at 1024 patches (a 448x448 image is 784): SDPA's flash kernel beats our varlen
kernel on larger frames (a 1280x720 image, 3520 patches: 18 ms eager against 52 ms in a graph,
second session).

Larger batches replay graphs of their exact grids instead, with SDPA per frame as eagerly, but
captured with cuDNN's attention tried first (`exact_sdpa`: planned once at the capture): a
batch's grids seen before (a server meets the same image sizes again and again) are captured on
their second arrival, the patch embedding included, at most `max_exact` of them (the least
recently used goes) and up to `max_exact_patches`. Everything else runs eagerly. On the H200 the
eager ViT of a 1280x720 image took 28.6 ms for 16.3 ms of GPU work until its rotary became one
kernel (qwen3vl_kernels.rope.vision_rotary); since, 13.2 ms for 13.0, and the exact graph saves 1-3 ms of
a first token. Without `capture` (CPU) the padded computation runs eagerly: tests check it there.
"""

from __future__ import annotations

import torch

from qwen3vl_kernels.varlen_attention import varlen_attention_bounded

from ..layers.attention import CUDNN_FIRST, sdpa_priority
from ..models.vision import grids_key

DEFAULT_BUCKETS = (256, 512, 1024)
MAX_SEGMENTS = 64
MAX_EXACT = 4                  # exact-grid graphs kept
MAX_EXACT_PATCHES = 8192       # a 1920x1080 image is 8160 patches


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
        self.max_exact, self.max_exact_patches = MAX_EXACT, MAX_EXACT_PATCHES
        self.exact: dict[tuple, tuple] = {}          # grids -> (graph, pixels in, outputs); most recent last
        self._seen: dict[tuple, None] = {}           # grids met once (bounded, oldest dropped)
        self.captured = False
        # SDPA's backend order while an exact grid is captured: its attention is planned once,
        # there, and replayed after (layers/attention.CUDNN_FIRST); None: SDPA's own order
        self.exact_sdpa = CUDNN_FIRST
        # how the last call ran, for the vit's stage lines: "bucket" (a bucket's graph), "replay"
        # or "capture" (an exact grid's graph), "first" (an exact grid's first arrival, eager),
        # "eager" (no graph fits)
        self.last_path = None
        # captures run on a stream of the encoder's own GPU: torch.cuda.graph's default side stream
        # is made once per process, on whichever GPU was current then (a replica on another GPU
        # would capture into the wrong device's stream: serving/vision_split.py)
        self.stream = torch.cuda.Stream(w.device) if w.is_cuda else None

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
            with torch.cuda.graph(graph, pool=pool, stream=self.stream):
                outputs = run()
            pool = graph.pool()
            self.graphs[b] = (graph, outputs)
        torch.cuda.synchronize()
        self.captured = True

    def _encoder(self, b: int):
        scale = self.visual.cfg.head_dim ** -0.5

        def attn(q, k, v, cu, _scale):
            return varlen_attention_bounded(q, k, v, self.cu, b, scale)

        return lambda: self.visual.encode(self.x[:b], self.cos[:b], self.sin[:b], None, attn)

    def _offsets(self, cu: list[int], b: int) -> list[int]:
        """Real frame offsets, then the padding segment up to b, then empty segments."""
        out = list(cu) + ([b] if cu[-1] < b else [])
        return out + [b] * (self.max_segments + 1 - len(out))

    def forget_grids(self) -> None:
        """Drop the exact-grid graphs and the grids met once (a warm-up's: they are not what
        requests will bring)."""
        self.exact.clear()
        self._seen.clear()

    def fits(self, num_patches: int, num_segments: int) -> bool:
        return num_patches <= self.buckets[-1] and num_segments + 1 <= self.max_segments

    def _exact(self, pixel_values: torch.Tensor, grid_thw):
        """(embeds, deepstack) from this grid list's graph, capturing it on the second arrival;
        None: run eagerly."""
        key = grids_key(grid_thw)
        hit = self.exact.pop(key, None)
        self.last_path = "replay"
        if hit is None:
            if not self.captured or pixel_values.shape[0] > self.max_exact_patches or self.max_exact < 1:
                self.last_path = "eager"
                return None
            if key not in self._seen:                          # the first arrival: only remembered
                self._seen[key] = None
                while len(self._seen) > 64:
                    self._seen.pop(next(iter(self._seen)))
                self.last_path = "first"
                return None
            self.last_path = "capture"
            del self._seen[key]
            while len(self.exact) >= self.max_exact:
                self.exact.pop(next(iter(self.exact)))         # its graph and memory pool go with it
            idx, w, cos, sin, cu = self.visual.tables(grid_thw, pixel_values.device)
            pixels = pixel_values.clone()
            attn = self.visual.attn_fn

            def run():
                return self.visual.encode(self.visual.embed(pixels, idx, w), cos, sin, cu, attn)

            with sdpa_priority(self.exact_sdpa):
                # eagerly first, which gives this arrival its outputs: cuDNN's attention plans the
                # grid's lengths here (planning inside a capture fails it), then the capture
                first = run()
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self.stream):
                    outputs = run()
            # the graph reads the tables: kept alive with it
            self.exact[key] = (graph, pixels, outputs, (idx, w, cos, sin))
            return first[0], list(first[1])
        self.exact[key] = hit
        graph, pixels, (embeds, deepstack), _ = hit
        pixels.copy_(pixel_values)
        graph.replay()
        return embeds.clone(), [d.clone() for d in deepstack]

    @torch.no_grad()
    def __call__(self, pixel_values: torch.Tensor, grid_thw):
        """Same contract as VisionModel.forward; eager when the batch does not fit a graph."""
        path = "eager"
        if pixel_values.shape[0] > self.buckets[-1] and pixel_values.is_cuda:
            out = self._exact(pixel_values.to(self.x.dtype), grid_thw)
            if out is not None:
                return out
            path = self.last_path                       # "first" (remembered) or "eager"
        x, cos, sin, cu = self.visual.prepare(pixel_values, grid_thw)
        n = x.shape[0]
        if not self.fits(n, len(cu) - 1):
            self.last_path = path
            return self.visual.encode(x, cos, sin, cu, self.visual.attn_fn)
        self.last_path = "bucket"
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
