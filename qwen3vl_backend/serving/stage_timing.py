"""Per-request step timings in the Triton models' logs (`QWEN3VL_STAGE_TIMING=1`): where a
request's milliseconds go inside preprocess and vit, which Triton's trace shows only as one
compute span per model. Off by default: a line per request per model."""

from __future__ import annotations

import os
import time

STAGE_TIMING = os.environ.get("QWEN3VL_STAGE_TIMING", "0") == "1"


def stage_line(timing: dict, started: float | None = None) -> str:
    """`key=ms` pairs (one decimal), per-item dicts as [k=ms ...], and the total since `started`
    (time.monotonic) when given."""
    def fmt(v):
        if isinstance(v, dict):
            return "[" + " ".join(f"{k}={x:.1f}" for k, x in v.items()) + "]"
        if isinstance(v, list):
            return " ".join(fmt(x) for x in v)
        return f"{v:.1f}"

    parts = [f"{k}={fmt(v)}" for k, v in timing.items()]
    if started is not None:
        parts.append(f"total={(time.monotonic() - started) * 1e3:.1f}")
    return " ".join(parts)
