"""What a kernel boundary costs in a batch-1 decode layer: a chain of PDL launches against one
cooperative launch whose phases meet at grid-wide barriers (the question a persistent MoE or
layer kernel answers).

A "layer" is three dependent phases, each streaming its own bytes (distinct per layer, so none
come from L2) in 64 KB units, 8 KB a K step, as the batch-1 MoE does: the router's rows, gate_up's
experts, down's experts (`--payload moe`: 0.5, 25.2 and 12.6 MB), or one step a program
(`--payload empty`: what the boundary alone costs). Variants:

- chain: three launches a layer, PDL, each program one unit after its wait;
- chain-prefetch: the same, each program's first step read before the wait (PDL_PREFETCH's way);
  chain-prefetch-sNk-wW-xX: with N KB K steps, W warps, each unit split over X programs (64 KB
  steps: a program's whole unit asked for at once);
- persistent-Pn: one cooperative launch a layer of n programs an SM, each walking the units of
  every phase, with a grid barrier (an atomic arrival count) between phases;
- persistent-Pn-ahead: the same, each program reading its first step of the next phase before
  the barrier.

    python -m benchmarks.handoff [--payload moe,empty] [--layers 48] [--out DIR]

GPU only (the barriers need every program resident at once, which the interpreter cannot do).
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from qwen3vl_kernels.fused_moe import sm_count
from qwen3vl_kernels.pdl import gdc_launch, gdc_wait, pdl

from .common import graph_time_ms, print_table, write_result

UNIT = 64 * 1024
STEP = 8 * 1024
PAYLOADS = {"moe": (0.5, 25.2, 12.6), "empty": (0.0, 0.0, 0.0)}


@triton.jit
def _unit_sum(w_ptr, unit, first, HAS_FIRST: tl.constexpr, UNIT_B: tl.constexpr, STEP_B: tl.constexpr):
    """The unit's bytes summed, STEP_B a load; from 32 KB steps each step is summed as it lands
    (an int32 accumulator of 32K+ lanes would not fit in registers)."""
    offs = tl.arange(0, STEP_B)
    base = w_ptr + unit.to(tl.int64) * UNIT_B
    if STEP_B >= 32768:
        total = tl.zeros([], tl.int32)
        if HAS_FIRST:
            total += tl.sum(first.to(tl.int32), 0)
            for k in range(STEP_B, UNIT_B, STEP_B):
                total += tl.sum(tl.load(base + k + offs).to(tl.int32), 0)
        else:
            for k in range(0, UNIT_B, STEP_B):
                total += tl.sum(tl.load(base + k + offs).to(tl.int32), 0)
        return total
    acc = tl.zeros([STEP_B], tl.int32)
    if HAS_FIRST:
        acc += first.to(tl.int32)
        for k in range(STEP_B, UNIT_B, STEP_B):
            acc += tl.load(base + k + offs).to(tl.int32)
    else:
        for k in range(0, UNIT_B, STEP_B):
            acc += tl.load(base + k + offs).to(tl.int32)
    return tl.sum(acc, 0)


@triton.jit
def _chain_kernel(w_ptr, out_ptr, PREFETCH: tl.constexpr, UNIT_B: tl.constexpr, STEP_B: tl.constexpr,
                  USE_PDL: tl.constexpr = False):
    pid = tl.program_id(0)
    gdc_launch(USE_PDL)
    offs = tl.arange(0, STEP_B)
    first = tl.zeros([STEP_B], tl.uint8)
    if PREFETCH:
        first = tl.load(w_ptr + pid.to(tl.int64) * UNIT_B + offs)
    gdc_wait(USE_PDL)
    s = _unit_sum(w_ptr, pid, first, PREFETCH, UNIT_B, STEP_B) + tl.load(out_ptr + pid)
    tl.store(out_ptr + pid, s)


@triton.jit
def _grid_barrier(bar_ptr, target):
    """Every program of the launch waits here until `target` arrivals are counted (the count
    keeps growing through a launch's barriers: the n-th barrier waits for n * programs). Triton
    makes the polling atomic an acquiring load by one thread."""
    tl.debug_barrier()
    tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _phase(w_ptr, units, pid, progs, first, AHEAD: tl.constexpr, UNIT_B: tl.constexpr, STEP_B: tl.constexpr):
    total = tl.zeros([], tl.int32)
    if AHEAD:
        if pid < units:
            total += _unit_sum(w_ptr, pid, first, True, UNIT_B, STEP_B)
        for u in range(pid + progs, units, progs):
            total += _unit_sum(w_ptr, u, first, False, UNIT_B, STEP_B)
    else:
        for u in range(pid, units, progs):
            total += _unit_sum(w_ptr, u, first, False, UNIT_B, STEP_B)
    return total


@triton.jit
def _persistent_kernel(w0, w1, w2, u0, u1, u2, out_ptr, bar_ptr, AHEAD: tl.constexpr, UNIT_B: tl.constexpr,
                       STEP_B: tl.constexpr, USE_PDL: tl.constexpr = False):
    pid = tl.program_id(0)
    progs = tl.num_programs(0)
    offs = tl.arange(0, STEP_B)
    first = tl.zeros([STEP_B], tl.uint8)
    if AHEAD:
        first = tl.load(w0 + pid.to(tl.int64) * UNIT_B + offs, mask=pid < u0, other=0)
    gdc_wait(USE_PDL)
    total = _phase(w0, u0, pid, progs, first, AHEAD, UNIT_B, STEP_B)
    if AHEAD:
        first = tl.load(w1 + pid.to(tl.int64) * UNIT_B + offs, mask=pid < u1, other=0)
    _grid_barrier(bar_ptr, progs)
    total += _phase(w1, u1, pid, progs, first, AHEAD, UNIT_B, STEP_B)
    if AHEAD:
        first = tl.load(w2 + pid.to(tl.int64) * UNIT_B + offs, mask=pid < u2, other=0)
    _grid_barrier(bar_ptr, 2 * progs)
    gdc_launch(USE_PDL)
    total += _phase(w2, u2, pid, progs, first, AHEAD, UNIT_B, STEP_B)
    tl.store(out_ptr + pid, total + tl.load(out_ptr + pid))
    # the last program out resets the counts for the next launch
    done = tl.atomic_add(bar_ptr + 1, 1, sem="acq_rel", scope="gpu")
    if done == progs - 1:
        tl.atomic_xchg(bar_ptr, 0)
        tl.atomic_xchg(bar_ptr + 1, 0)


def _units(mb: float) -> int:
    return max(1, round(mb * 1e6 / UNIT))


def run(payload: str, layers: int) -> list[dict]:
    dev = torch.device("cuda")
    sms = sm_count(dev)
    units = [_units(mb) if mb else sms for mb in PAYLOADS[payload]]
    unit_b = UNIT if PAYLOADS[payload][0] else STEP
    weights = [[torch.randint(0, 255, (u * unit_b,), dtype=torch.uint8, device=dev) for u in units]
               for _ in range(layers)]
    out = torch.zeros(max(max(units), 4 * sms), dtype=torch.int32, device=dev)
    bar = torch.zeros(2, dtype=torch.int32, device=dev)
    kw = pdl(out)

    def chain(prefetch: bool, step: int = STEP, warps: int = 4, split: int = 1):
        # split > 1: each 64 KB unit as `split` programs of its parts
        def fn():
            for layer in weights:
                for w, u in zip(layer, units):
                    _chain_kernel[(u * split,)](w, out, PREFETCH=prefetch, UNIT_B=unit_b // split,
                                                STEP_B=min(step, unit_b // split), num_warps=warps, **kw)
        return fn

    def persistent(per_sm: int, ahead: bool):
        def fn():
            for w0, w1, w2 in weights:
                _persistent_kernel[(per_sm * sms,)](w0, w1, w2, *units, out, bar, AHEAD=ahead, UNIT_B=unit_b,
                                                    STEP_B=STEP, num_warps=4,
                                                    launch_cooperative_grid=True, **kw)
        return fn

    variants = {"chain": chain(False), "chain-prefetch": chain(True)}
    if unit_b == UNIT:           # streaming shapes: K step bytes, warps, programs a unit
        for step, warps, split in ((16384, 4, 1), (16384, 8, 1), (32768, 8, 1), (8192, 4, 2), (8192, 4, 4),
                                   (16384, 8, 2), (4096, 4, 1), (4096, 2, 4), (65536, 8, 1), (65536, 16, 1),
                                   (32768, 8, 2), (16384, 4, 4)):
            variants[f"chain-prefetch-s{step // 1024}k-w{warps}-x{split}"] = chain(True, step, warps, split)
    for per_sm in (1, 2, 3):
        variants[f"persistent-P{per_sm}"] = persistent(per_sm, False)
        variants[f"persistent-P{per_sm}-ahead"] = persistent(per_sm, True)
    mb = sum(u * unit_b for u in units) / 1e6
    rows = []
    for name, fn in variants.items():
        try:
            ms = graph_time_ms(fn, iters=10)
        except Exception as exc:       # a variant the device refuses (a grid too large to be resident)
            rows.append({"payload": payload, "variant": name, "error": str(exc)[:120]})
            torch.cuda.synchronize()
            continue
        us = 1e3 * ms / layers
        rows.append({"payload": payload, "variant": name, "us_per_layer": us, "mb_per_layer": mb,
                     "tb_s": mb / us if mb else None})
        print(f"{payload} {name}: {us:.2f} us a layer", flush=True)    # a run cut short keeps these
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--payload", default="moe,empty")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = []
    for payload in args.payload.split(","):
        rows += run(payload, args.layers)
    print_table(rows, ["payload", "variant", "us_per_layer", "mb_per_layer", "tb_s", "error"])
    write_result("handoff", {"layers": args.layers, "unit_bytes": UNIT, "step_bytes": STEP}, rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
