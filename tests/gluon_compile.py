"""Compiles kernels.gluon_dense's W8A8 kernel (or, with the argument `pairs`, kernels.gluon_pairs'
down kernel) for Hopper (sm_90a) without a GPU and prints one JSON line per launch shape: its
wgmma waits, TMA copies, PDL controls, and what ptxas (Triton's own) says of it: registers,
spills, and whether it serialized the wgmmas (C7514: an instruction read a product's registers
before its wait, which takes away the overlap the kernel is for). Run without TRITON_INTERPRET
(tests/test_gluon_dense.py and tests/test_gluon_pairs.py do)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET"):
    raise SystemExit("run without TRITON_INTERPRET")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from kernels import gluon_dense, gluon_pairs  # noqa: E402

# (BLOCK_N, BLOCK_T, STAGES, STEPS, SPLIT_K, num_warps): 30B qkv/o_proj at 16 and 32 rows a program
SHAPES = [(64, 32, 4, 16, 1, 4), (64, 16, 4, 4, 4, 4), (64, 32, 6, 8, 2, 4), (128, 32, 4, 8, 2, 8),
          (64, 16, 2, 2, 8, 4), (64, 16, 16, 16, 1, 4), (64, 32, 12, 16, 1, 4)]
# gluon_pairs' down (TOP_K, K, BLOCK_N, num_warps, PREFETCH): 30B-A3B's (K 768), 235B-A22B's (1536)
PAIR_SHAPES = [(8, 768, 8, 4, True), (8, 768, 16, 4, True), (8, 768, 8, 4, False), (8, 1536, 8, 4, True),
               (8, 768, 16, 8, True)]


def _ptx(fn, consts: dict, pointers: dict, warps: int) -> str:
    """fn's PTX for sm_90a: `consts` its constexprs, `pointers` the types of its non-i32 arguments."""
    from triton.experimental.gluon._runtime import GluonASTSource

    signature, values = {}, {}
    for p in fn.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            values[(fn.arg_names.index(p.name),)] = consts[p.name]
        else:
            signature[p.name] = pointers.get(p.name, "i32")
    return triton.compile(GluonASTSource(fn, signature, values), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps)).asm["ptx"]


def _ptxas(ptx: str) -> dict:
    """Registers, spill bytes and C7514 (serialized wgmmas) from Triton's ptxas; {} without it."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.ptx").write_text(ptx)
        info = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", "k.ptx", "-o", "k.cubin"], cwd=tmp,
                              capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", info)
    spills = re.search(r"(\d+) bytes spill stores", info)
    return dict(registers=int(regs.group(1)) if regs else None, spills=int(spills.group(1)) if spills else None,
                serialized="C7514" in info)


def compile_one(block_n, bt, stages, steps, split, warps) -> dict:
    w_layout, a_layout = gluon_dense._layouts(block_n, bt)
    consts = dict(BLOCK_N=block_n, BLOCK_T=bt, BLOCK_K=128, SCALE_N=128, STAGES=stages, STEPS=steps, SPLIT_K=split,
                  USE_PDL=True, num_warps=warps)
    pointers = dict(sw_ptr="*fp32", sa_ptr="*fp32", y_ptr="*bf16", ws_ptr="*fp32", count_ptr="*i32",
                    w_desc=f"tensordesc<fp8e4nv[{block_n}, 128],{w_layout!r}>",
                    a_desc=f"tensordesc<fp8e4nv[{bt}, 128],{a_layout!r}>")
    ptx = _ptx(gluon_dense._w8a8_kernel, consts, pointers, warps)
    out = {"shape": [block_n, bt, stages, steps, split, warps],
           "wait1": ptx.count("wgmma.wait_group.sync.aligned 1;"),
           "wait0": ptx.count("wgmma.wait_group.sync.aligned 0;"),
           "mma": ptx.count("wgmma.mma_async"), "tma": ptx.count("cp.async.bulk.tensor"),
           "pdl": [m for m in re.findall(r"griddepcontrol\.(\w+)", ptx)],
           "tma_before_wait": ptx.split("griddepcontrol.wait")[0].count("cp.async.bulk.tensor")}
    return {**out, **_ptxas(ptx)}


def compile_down(top_k, k, block_n, warps, prefetch) -> dict:
    layout = gluon_pairs._layout(block_n)
    consts = dict(TOP_K=top_k, STEPS=gluon_pairs.steps(k), BLOCK_N=block_n, BN=128, PREFETCH=prefetch, USE_PDL=True,
                  num_warps=warps)
    pointers = dict(act_ptr="*bf16", ids_ptr="*i32", weights_ptr="*fp32", out_ptr="*bf16", s_ptr="*fp32",
                    w_desc=f"tensordesc<fp8e4nv[{block_n}, 128],{layout!r}>")
    ptx = _ptx(gluon_pairs._down_kernel, consts, pointers, warps)
    out = {"shape": [top_k, k, block_n, warps, prefetch], "tma": ptx.count("cp.async.bulk.tensor"),
           "pdl": [m for m in re.findall(r"griddepcontrol\.(\w+)", ptx)],
           "tma_before_wait": ptx.split("griddepcontrol.wait")[0].count("cp.async.bulk.tensor")}
    return {**out, **_ptxas(ptx)}


if __name__ == "__main__":
    if not gluon_dense.available():
        print(json.dumps({"skip": "this Triton has no Gluon"}))
        raise SystemExit(0)
    pairs = sys.argv[1:] == ["pairs"]
    for shape in PAIR_SHAPES if pairs else SHAPES:
        print(json.dumps(compile_down(*shape) if pairs else compile_one(*shape)), flush=True)
