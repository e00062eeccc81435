"""Per-request step timings in the Triton models' logs (`QWEN3VL_STAGE_TIMING=1`): where a
request's milliseconds go inside preprocess and vit, which Triton's trace shows only as one
compute span per model. Off by default: a line per request per model. `QWEN3VL_STAGE_PROFILE=DIR`
also profiles a few of the vit model's requests (RequestProfiler); `QWEN3VL_STAGE_PROFILE_AT=8,25`
picks which (the 8th and the 25th request the model meets, e.g. a benchmark's warm-ups, whose
slower profiled run then stays out of the timed rows)."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

STAGE_TIMING = os.environ.get("QWEN3VL_STAGE_TIMING", "0") == "1"


def stage_line(timing: dict, started: float | None = None) -> str:
    """`key=ms` pairs (one decimal; a string as it is), per-item dicts as [k=ms ...], and the total
    since `started` (time.monotonic) when given."""
    def fmt(v):
        if isinstance(v, dict):
            return "[" + " ".join(f"{k}={x:.1f}" for k, x in v.items()) + "]"
        if isinstance(v, list):
            return " ".join(fmt(x) for x in v)
        return v if isinstance(v, str) else f"{v:.1f}"

    parts = [f"{k}={fmt(v)}" for k, v in timing.items()]
    if started is not None:
        parts.append(f"total={(time.monotonic() - started) * 1e3:.1f}")
    return " ".join(parts)


class RequestProfiler:
    """`QWEN3VL_STAGE_PROFILE=DIR`: torch.profiler over requests `first` .. `first + count - 1` of
    a model (past its warm-up and the ViT's graph capture, by default the 4th to the 6th), one
    table of host and GPU time per operator each, to DIR/<name>-<n>-<request id>.txt. The stage
    logs say how long a step took; this says which call inside it."""

    def __init__(self, directory: str | None, name: str, first: int = 4, count: int = 3, at: str = ""):
        self.directory, self.name = directory, name
        self.picked = {int(x) for x in at.split(",") if x.strip()} or set(range(first, first + count))
        self.seen = 0

    @contextlib.contextmanager
    def __call__(self, request_id: str):
        self.seen += 1
        if not self.directory or self.seen not in self.picked:
            yield
            return
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=activities) as prof:
            yield
        table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=40)
        path = Path(self.directory) / f"{self.name}-{self.seen}-{''.join(c for c in request_id if c.isalnum())[:16]}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(table)


PROFILE_DIR = os.environ.get("QWEN3VL_STAGE_PROFILE") or None
PROFILE_AT = os.environ.get("QWEN3VL_STAGE_PROFILE_AT", "")
