"""Compiles qwen3vl_kernels.gluon_dense's W8A8 kernel for Hopper (sm_90a) without a GPU and prints one JSON
line per launch shape: its wgmma waits, TMA copies, PDL controls, and what ptxas (Triton's own)
says of it: registers, spills, and whether it serialized the wgmmas (C7514: an instruction read a
product's registers before its wait, which takes away the overlap the kernel is for). Run without
TRITON_INTERPRET (tests/test_gluon_dense.py does)."""

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

from qwen3vl_kernels import gluon_dense  # noqa: E402

# (BLOCK_N, BLOCK_T, STAGES, STEPS, SPLIT_K, num_warps): 30B qkv/o_proj at 16 and 32 rows a program
SHAPES = [(64, 32, 4, 16, 1, 4), (64, 16, 4, 4, 4, 4), (64, 32, 6, 8, 2, 4), (128, 32, 4, 8, 2, 8),
          (64, 16, 2, 2, 8, 4), (64, 16, 16, 16, 1, 4), (64, 32, 12, 16, 1, 4)]


def compile_one(block_n, bt, stages, steps, split, warps) -> dict:
    from triton.experimental.gluon._runtime import GluonASTSource

    fn = gluon_dense._w8a8_kernel
    w_layout, a_layout = gluon_dense._layouts(block_n, bt)
    consts = dict(BLOCK_N=block_n, BLOCK_T=bt, BLOCK_K=128, SCALE_N=128, STAGES=stages, STEPS=steps, SPLIT_K=split,
                  USE_PDL=True, num_warps=warps)
    pointers = dict(sw_ptr="*fp32", sa_ptr="*fp32", y_ptr="*bf16", ws_ptr="*fp32", count_ptr="*i32",
                    w_desc=f"tensordesc<fp8e4nv[{block_n}, 128],{w_layout!r}>",
                    a_desc=f"tensordesc<fp8e4nv[{bt}, 128],{a_layout!r}>")
    signature, values = {}, {}
    for p in fn.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            values[(fn.arg_names.index(p.name),)] = consts[p.name]
        else:
            signature[p.name] = pointers.get(p.name, "i32")
    ptx = triton.compile(GluonASTSource(fn, signature, values), target=GPUTarget("cuda", 90, 32),
                         options=dict(num_warps=warps)).asm["ptx"]
    out = {"shape": [block_n, bt, stages, steps, split, warps],
           "wait1": ptx.count("wgmma.wait_group.sync.aligned 1;"),
           "wait0": ptx.count("wgmma.wait_group.sync.aligned 0;"),
           "mma": ptx.count("wgmma.mma_async"), "tma": ptx.count("cp.async.bulk.tensor"),
           "pdl": [m for m in re.findall(r"griddepcontrol\.(\w+)", ptx)],
           "tma_before_wait": ptx.split("griddepcontrol.wait")[0].count("cp.async.bulk.tensor")}
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if ptxas.exists():
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "k.ptx").write_text(ptx)
            info = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", "k.ptx", "-o", "k.cubin"], cwd=tmp,
                                  capture_output=True, text=True).stderr
        regs = re.search(r"Used (\d+) registers", info)
        spills = re.search(r"(\d+) bytes spill stores", info)
        out.update(registers=int(regs.group(1)) if regs else None, spills=int(spills.group(1)) if spills else None,
                   serialized="C7514" in info)
    return out


if __name__ == "__main__":
    if not gluon_dense.available():
        print(json.dumps({"skip": "this Triton has no Gluon"}))
        raise SystemExit(0)
    for shape in SHAPES:
        print(json.dumps(compile_one(*shape)), flush=True)
