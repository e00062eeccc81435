"""Tuned launch tables (`qwen3vl_kernels/configs/*.json`, written by the benchmarks' sweeps), read through
one lookup by every kernel.

A GPU reads its own table, else the H200's (where the tables were tuned: another Hopper's best
guess), else none, and the kernel keeps its built-in default. Each kernel names its files
(`path_for(device_name)`); keys that are digits (batch sizes) become ints, the rest ("N,K"
shapes, settings such as "pair_path_max_m") stay as written.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
HOME_DEVICE = "NVIDIA H200"


def device_file(kind: str, device_name: str, suffix: str = "") -> Path:
    """configs/{kind},device={name with underscores}{suffix}.json"""
    return CONFIG_DIR / f"{kind},device={device_name.replace(' ', '_')}{suffix}.json"


@functools.lru_cache(maxsize=None)
def read_table(path: str) -> dict | None:
    """One table file, or None when there is none."""
    p = Path(path)
    if not p.exists():
        return None
    return {int(k) if k.isdigit() else k: v for k, v in json.loads(p.read_text()).items()}


def device_table(path_for: Callable[[str], Path], device_name: str) -> dict | None:
    """This GPU's table, else the home device's, else None."""
    for name in dict.fromkeys((device_name, HOME_DEVICE)):
        table = read_table(str(path_for(name)))
        if table is not None:
            return table
    return None
