"""Programmatic dependent launch (Hopper and later): a decode step's kernels overlap their launch.

At batch 1 a decode layer is a chain of about eight small kernels, each waiting for the last to
finish before its programs are even scheduled. Launched with PDL, a kernel's programs may start
as soon as every program of the one before has begun (`gdc_launch_dependents`); each then waits
(`gdc_wait`) until that kernel has finished and its writes are visible, before touching memory.
So the wait comes before every PDL kernel's first read or write of anything a kernel writes
(a GEMV may fetch its first weight tile before it: weights are only read), and a kernel without
it is never launched with the flag. CUDA graphs keep the overlap (captured as programmatic edges).

QWEN3VL_PDL=0 turns it off (for comparison, or a driver that mishandles it). Reading before the
wait what the kernel before does not write is qwen3vl_kernels.switches.PDL_PREFETCH (on: 3.5% off a
batch-1 decode step on an H200).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@functools.lru_cache(maxsize=None)
def _supported(index: int) -> bool:
    return os.environ.get("QWEN3VL_PDL", "1") != "0" and torch.cuda.get_device_capability(index)[0] >= 9


def pdl(t: torch.Tensor) -> dict:
    """Launch keywords for a kernel taking USE_PDL, whose launch reads or writes `t`'s device."""
    if t.is_cuda and _supported(t.device.index if t.device.index is not None else torch.cuda.current_device()):
        return {"launch_pdl": True, "USE_PDL": True}
    return {}


@triton.jit
def gdc_launch(USE_PDL: tl.constexpr):
    """Let the next kernel's programs launch (once every program of this one has said so)."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def gdc_wait(USE_PDL: tl.constexpr):
    """Wait until the previous kernel has finished and its writes are visible."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def gdc_enter(USE_PDL: tl.constexpr):
    """First statement of a PDL kernel: let the next kernel launch, then wait for the last one.
    (A kernel may read what no kernel writes, its weights, between the two.)"""
    gdc_launch(USE_PDL)
    gdc_wait(USE_PDL)
