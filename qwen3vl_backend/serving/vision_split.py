"""One request's media encoded on several GPUs at once (`--mm-enable-dp-encoder`).

A vit instance holds a replica of the vision encoder on its own GPU and the group's next one
(`replica_gpus`). A request's frame groups (an image is one, a video one per temporal patch) are
cut into contiguous runs, one per GPU, balanced by patch count; the other GPUs' runs are issued
first (their work is queued while the home GPU's is being launched), and their outputs come back
to one GPU (the home GPU, or the one the llm reads them on) in the request's order. Frame groups
are encoded independently of each other (each attends only to itself, at positions that depend on
its height and width alone), so the result is the single-GPU one. Measured on two H200s for the
235B model's two 1280x720 images: benchmarks/results/NOTES.md.
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
    sum is the smallest possible: the smallest capacity that a greedy packing fits into `parts`
    runs (binary search; a video's hundreds of frame groups take microseconds)."""
    if not sizes:
        return []
    parts = max(1, min(parts, len(sizes)))

    def pack(capacity: int) -> list[tuple[int, int]]:
        runs, start, total = [], 0, 0
        for i, s in enumerate(sizes):
            if total + s > capacity and i > start:
                runs.append((start, i))
                start, total = i, 0
            total += s
        return runs + [(start, len(sizes))]

    lo, hi = max(sizes), sum(sizes)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(pack(mid)) <= parts:
            hi = mid
        else:
            lo = mid + 1
    return pack(lo)


def frame_groups(grids: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """The units a request's items split into: each (item, its first patch row, patches) is one
    frame group of an item (an image has one, a video one per temporal patch). The ViT attends
    within a frame group only and its positions depend on h and w alone, so any contiguous run of
    groups encodes as its own request to the same rows."""
    units, row = [], 0
    for i, (t, h, w) in enumerate(grids):
        for _ in range(t):
            units.append((i, row, h * w))
            row += h * w
    return units


def encode_split(replicas, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]],
                 out: torch.device | None = None):
    """replicas: [(device, encode)] with the home device first; encode(pixels, grids) ->
    (embeds, deepstack list) on its device. -> the same for all items, on `out` (default: the
    home device). The frame groups (`frame_groups`) are cut into contiguous runs balanced by
    patches, one a GPU: a request's images, or one video's frames, are spread over the GPUs."""
    home = out if out is not None else replicas[0][0]
    units = frame_groups(grids)
    if len(replicas) == 1 or len(units) == 1:
        device, encode = replicas[0]
        with device_context(device):
            embeds, deepstack = encode(pixel_values, grids)
        if device == home:
            return embeds, deepstack
        return embeds.to(home, non_blocking=True), [d.to(home, non_blocking=True) for d in deepstack]
    runs = balanced_runs([n for _, _, n in units], len(replicas))
    outputs: list = [None] * len(runs)
    for r in reversed(range(len(runs))):          # the helpers' work first, the home GPU's last
        (device, encode), (a, b) = replicas[r], runs[r]
        sub: list[list[int]] = []                 # the run's groups as grids: an item's consecutive groups merge
        for item, _, _ in units[a:b]:
            if sub and sub[-1][3] == item:
                sub[-1][0] += 1
            else:
                sub.append([1, grids[item][1], grids[item][2], item])
        first, last = units[a], units[b - 1]
        with device_context(device):
            outputs[r] = encode(pixel_values[first[1]:last[1] + last[2]], [(t, h, w) for t, h, w, _ in sub])
    embeds = torch.cat([e.to(home, non_blocking=True) for e, _ in outputs])
    levels = len(outputs[0][1])
    deepstack = [torch.cat([d[level].to(home, non_blocking=True) for _, d in outputs]) for level in range(levels)]
    return embeds, deepstack


def device_context(device: torch.device):
    """The device context an encoder's CUDA work (and its graphs) needs; nothing on CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def warm_exact_grids(replicas, grids: list[tuple[int, int, int]], frame_width: int, times: int = 3) -> None:
    """Each replica meets each image grid alone, as a request of one image, or of two split over two
    replicas, brings it: `times` encodes of blank pixels (uint8 single frames, `frame_width` values a
    patch), which with exact-grid graphs are the cold first arrival, the capture, then a replay.
    `replicas`: (device, encode(pixels, grids)) as encode_split takes them."""
    for grid in grids:
        for device, encode in replicas:
            with device_context(device):
                for _ in range(times):
                    encode(torch.zeros(grid[1] * grid[2], frame_width, dtype=torch.uint8, device=device), [grid])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
