"""Shared by the benchmark scripts: device facts, commit, a table printer and the JSON writer."""

from __future__ import annotations

import base64
import io
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = Path(__file__).resolve().parent.parent / "qwen3vl_backend" / "data" / "configs"


def fp8_experts(w13: torch.Tensor, w2: torch.Tensor, block: tuple[int, int]):
    """Stacked expert weights (E, N, K) -> (q13, s13, q2, s2): each expert's block-fp8 weights and scales."""
    from qwen3vl_kernels.fp8 import quantize_weight_blocks

    return tuple(torch.stack(t) for w in (w13, w2) for t in zip(*(quantize_weight_blocks(x.float(), block) for x in w)))


def bundled_model_dir(name: str, parent: str | Path) -> Path:
    """A weights-free checkpoint directory (config, tokenizer, processor files) for a bundled config."""
    from qwen3vl_backend.tools.make_tiny_checkpoint import write_model_dir

    return write_model_dir(Path(parent) / name, json.loads((CONFIGS / f"{name}.json").read_text()))


def device_info() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, sms=p.multi_processor_count, memory_gb=round(p.total_memory / 2**30, 1))
        try:
            import triton
            info["triton"] = triton.__version__
        except ImportError:
            pass
    else:
        info["device"] = "cpu"
    return info


def commit() -> str:
    """HEAD's short hash; QWEN3VL_COMMIT overrides it (a copied checkout may carry a stale .git)."""
    if os.environ.get("QWEN3VL_COMMIT"):
        return os.environ["QWEN3VL_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def write_result(name: str, settings: dict, rows: list[dict], out_dir: str | Path | None = None) -> Path:
    out = Path(out_dir or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dev = device_info()
    path = out / f"{name}-{dev['device'].replace(' ', '_')}-{stamp}.json"
    path.write_text(json.dumps({"benchmark": name, "commit": commit(), "device": dev, "settings": settings,
                                "rows": rows, "time": stamp}, indent=2))
    return path


def cuda_time_ms(fn, warmup: int = 3, iters: int = 20) -> float:
    """Median milliseconds of fn() by CUDA events, after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def graph_time_ms(fn, iters: int = 20) -> float:
    """Median milliseconds of one replay of fn() captured in a CUDA graph (no launch overhead)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return cuda_time_ms(graph.replay, warmup=2, iters=iters)


def per_call_ms(fn, calls: int = 16) -> float:
    """Graph-replay time of one call, fn(0) .. fn(calls - 1) captured back to back (no launch
    overhead). fn(i) should read different weights for different i, so that what one call leaves
    in L2 does not serve the next: a decode step reads each layer's weights once."""
    def many():
        for i in range(calls):
            fn(i)
    return graph_time_ms(many, iters=10) / calls


def variant_row(row: dict, call, want, floor_us: float, calls: int, ncu: bool = False) -> dict | None:
    """One launch variant of a kernel (benchmarks.moe_variants, dense_variants): call(0) against
    `want`, then timed per call over call(0 .. calls - 1) -> `row` with us, floor_us, floor_over
    and rel_err, or with the error where the variant does not compile or launch. `ncu`: call(0)
    and call(1) only, untimed, for Nsight Compute; None back."""
    try:
        out = call(0).float()
        if ncu:
            call(1)
            torch.cuda.synchronize()
            return None
        us = per_call_ms(call, calls) * 1e3
    except Exception as e:  # noqa: BLE001 - a variant that does not compile or launch is a row
        torch.cuda.synchronize()
        return {**row, "error": f"{type(e).__name__}: {str(e)[:120]}"}
    err = ((out - want).norm() / want.norm()).item()
    return {**row, "us": round(us, 2), "floor_us": round(floor_us, 2), "floor_over": round(floor_us / us, 3),
            "rel_err": f"{err:.2e}"}


def against_table(rows: list[dict], **same) -> None:
    """Each timed row whose fields equal `same` gets vs_table: its time over the "table" variant's."""
    group = [r for r in rows if "us" in r and all(r.get(k) == v for k, v in same.items())]
    table = [r for r in group if r["variant"] == "table"]
    for r in group if table else ():
        r["vs_table"] = round(r["us"] / table[0]["us"], 3)


def image_data_uri(img, fmt: str = "png") -> str:
    """A PIL image as the data: URI a client would send: PNG (lossless) or JPEG (quality 90)."""
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG")
    elif fmt == "jpeg":
        img.save(buf, format="JPEG", quality=90)
    else:
        raise ValueError(f"image format {fmt!r}: png or jpeg")
    return f"data:image/{fmt};base64," + base64.b64encode(buf.getvalue()).decode()
