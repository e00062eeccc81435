"""One request's media items encoded on several GPUs at once (`--mm-enable-dp-encoder`).

A vit instance holds a replica of the vision encoder on its own GPU and the group's next one
(`replica_gpus`). A request with several items is cut into contiguous runs of items, one per GPU, balanced
by patch count; the other GPUs' runs are issued first (their work is queued while the home
GPU's is being launched), and their outputs come back to one GPU (the home GPU, or the one the
llm reads them on) in the request's order.
Items are encoded independently of each other (each frame attends only to itself), so the
result is the single-GPU one. Measured on two H200s for the 235B model's two 1280x720 images:
see benchmarks/results/NOTES.md.
"""

from __future__ import annotations

import contextlib

import torch


# GPUs one instance encodes on: its own and the next. Every instance holds a replica on each of
# its GPUs, so with one instance a GPU (--mm-enable-dp-encoder) each GPU holds this many ViTs
# (235B's: ~1.2 GB each, plus graphs), where all of the group's would grow with its size.
MAX_SPLIT_GPUS = 2


def replica_gpus(instance: int, gpus: int, first: int = 0, limit: int = MAX_SPLIT_GPUS) -> list[int]:
    """The GPU indices instance `instance` of `gpus` (one a GPU, from GPU `first`) encodes on,
    its own first."""
    return [first + (instance + j) % gpus for j in range(min(gpus, limit))]


def balanced_runs(sizes: list[int], parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) runs of `sizes`, at most `parts` of them, none empty, whose largest
    sum is the smallest possible (exact, by dynamic programming over the few items a request has)."""
    n = len(sizes)
    parts = max(1, min(parts, n))
    prefix = [0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    inf = float("inf")
    # best[k][i]: the smallest largest run over the first i items in k runs; cut[k][i]: its last cut
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for k in range(1, parts + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    k = min(range(1, parts + 1), key=lambda p: (best[p][n], p))
    runs, i = [], n
    while k:
        j = cut[k][i]
        runs.append((j, i))
        i, k = j, k - 1
    return runs[::-1]


def encode_split(replicas, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]],
                 out: torch.device | None = None):
    """replicas: [(device, encode)] with the home device first; encode(pixels, grids) ->
    (embeds, deepstack list) on its device. -> the same for all items, on `out` (default: the
    home device)."""
    home = out if out is not None else replicas[0][0]
    if len(replicas) == 1 or len(grids) == 1:
        device, encode = replicas[0]
        with _on(device):
            embeds, deepstack = encode(pixel_values, grids)
        if device == home:
            return embeds, deepstack
        return embeds.to(home, non_blocking=True), [d.to(home, non_blocking=True) for d in deepstack]
    patches = [t * h * w for t, h, w in grids]
    starts = [0]
    for p in patches:
        starts.append(starts[-1] + p)
    runs = balanced_runs(patches, len(replicas))
    outputs: list = [None] * len(runs)
    for r in reversed(range(len(runs))):          # the helpers' work first, the home GPU's last
        (device, encode), (a, b) = replicas[r], runs[r]
        with _on(device):
            outputs[r] = encode(pixel_values[starts[a]:starts[b]], grids[a:b])
    embeds = torch.cat([e.to(home, non_blocking=True) for e, _ in outputs])
    levels = len(outputs[0][1])
    deepstack = [torch.cat([d[level].to(home, non_blocking=True) for _, d in outputs]) for level in range(levels)]
    return embeds, deepstack


def _on(device: torch.device):
    """The device context an encoder's CUDA work (and its graphs) needs; nothing on CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
