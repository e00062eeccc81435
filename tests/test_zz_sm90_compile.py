"""Kernels compiled for an H100/H200 (sm_90: Triton's front end, its passes and ptxas, which Triton
ships) on a machine without a GPU. The interpreter runs a kernel's Python and misses what only
the compiler refuses: a variable whose type changes in a loop, code compiled past a return in a
constexpr branch. An integer-conversion variant of the pair kernels (INT_CVT at dbb55de,
measured slower and gone) failed so on the H200 after passing every interpreter test; this
file's first pair test, which set INT_CVT, failed on it.

Named to run last: `test_every_recorded_launch_compiles_for_sm90` compiles each distinct launch
the interpreter ran earlier in this session (tests/launch_record.py). The compiling runs in a
child process without TRITON_INTERPRET (interpreted kernels cannot be compiled)."""

import itertools
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP = 3                                          # the child's exit status: nothing to check here


def _compile_one(rec: dict) -> str | None:
    """None, or why `rec` (launch_record's) does not compile for sm_90."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(rec["module"]), rec["name"])
    # as launched, where the record asks for the resource check (registers differ otherwise): the
    # arguments the launch found divisible by 16 marked so, those equal to 1 made constants
    as_launched = "max_stack" in rec or "max_regs" in rec
    attrs = ({(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in rec.get("aligned", ())}
             if as_launched else None)
    ones = {name: 1 for name in rec.get("ones", ())} if as_launched else {}
    consts = {**rec["consts"], **ones}
    src = ASTSource(fn=fn, signature={**{k: v for k, v in rec["types"].items() if k not in ones},
                                      **{k: "constexpr" for k in consts}}, constexprs=consts, attrs=attrs)
    try:
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": rec["num_warps"], "num_stages": rec["num_stages"],
                                         **({"maxnreg": rec["maxnreg"]} if rec.get("maxnreg") else {})})
    except Exception as e:                   # the compiler's own errors are many types
        lines = [line for line in str(e).splitlines() if line.strip()]
        return f"{type(e).__name__}: {lines[-1] if lines else e}"
    if not kernel.asm.get("cubin"):
        return "no sm_90 binary"
    missing = [text for text in rec.get("ptx_has", ()) if text not in kernel.asm["ptx"]]
    if missing:
        return f"PTX without {missing}"
    where = [kernel.asm["ptx"].find(text) for text in rec.get("ptx_order", ())]
    if -1 in where or where != sorted(where):
        return f"PTX without {rec['ptx_order']} in that order: first at {where}"
    if "max_stack" in rec or "max_regs" in rec:
        regs, stack = sm90_resources(kernel.asm["cubin"])
        if stack > rec.get("max_stack", stack):
            return f"{regs} registers and a {stack}-byte stack frame (registers spilled)"
        if regs > rec.get("max_regs", regs):
            return f"{regs} registers a thread, over {rec['max_regs']}"
    return None


def sm90_resources(cubin: bytes) -> tuple[int, int]:
    """(registers a thread, stack frame bytes) of a cubin's kernel, by the cuobjdump Triton ships."""
    import re

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if found is None:
        raise RuntimeError(f"cuobjdump -res-usage: no REG/STACK in {out!r}")
    return int(found.group(1)), int(found.group(2))


def pair_kernel_records() -> list[dict]:
    """The MoE pair kernels, fp8 or not, GROUP_SCALE and PREFETCH, as fused_moe_pairs launches
    them (recorded, not run; with their PDL twins): run alone, this file still compiles them."""
    import torch

    import launch_record
    from qwen3vl_kernels.fused_moe import fused_moe_pairs

    e, inter, hidden, a, block = 8, 256, 512, 4, (128, 128)
    cfg = {"BLOCK_N": 8, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3, "DOWN_BLOCK_N": 8, "DOWN_BLOCK_K": 256,
           "down_warps": 4, "down_stages": 1}
    with launch_record.only_recording() as rec:
        for fp8, group_scale, prefetch in itertools.product([False, True], repeat=3):
            dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
            w13, w2 = torch.empty(e, 2 * inter, hidden, dtype=dtype), torch.empty(e, hidden, inter, dtype=dtype)
            scales = (torch.ones(e, 2 * inter // 128, hidden // 128), torch.ones(e, hidden // 128, inter // 128)) \
                if fp8 else (None, None)
            fused_moe_pairs(torch.empty(2, hidden, dtype=torch.bfloat16), w13, w2, torch.ones(2, a),
                            torch.zeros(2, a, dtype=torch.int32),
                            {**cfg, "GROUP_SCALE": group_scale, "DOWN_GROUP_SCALE": group_scale}, *scales, block,
                            prefetch=prefetch)
    return list(rec.records.values())


def _run_child(records: list[dict]) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(records, f)
    try:
        out = subprocess.run([sys.executable, __file__, f.name], env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=1200)
    finally:
        os.unlink(f.name)
    if out.returncode == SKIP:
        pytest.skip(out.stdout.strip().splitlines()[-1])
    return out.returncode, out.stdout[-6000:] + out.stderr[-3000:]


def _assert_all_compile(records: list[dict]) -> None:
    code, log = _run_child(records)
    assert code == 0 and f"compiled {len(records)} of {len(records)}" in log, log


def _needs_interpreter() -> None:
    """Launches are recorded (launch_record.only_recording) only where the interpreter runs them."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("recording launches needs the interpreter (the CPU tests' mode)")


def test_moe_pair_kernels_compile_for_sm90():
    _needs_interpreter()
    records = pair_kernel_records()
    assert len(records) >= 16, len(records)
    _assert_all_compile(records)


def test_every_recorded_launch_compiles_for_sm90():
    """Each distinct launch (kernel, argument types, constexprs, warps, stages) the interpreter
    ran in this session's earlier tests compiles for sm_90."""
    import launch_record

    records = [r for r in launch_record.RECORDS.values()
               if not any(str(v).startswith("?") for v in [*r["types"].values(), *r["consts"].values()])]
    if not records:
        pytest.skip("no interpreted launches recorded before this test (run with the kernel tests, on a CPU)")
    _assert_all_compile(records)


def test_half2_row_kernel_compiles_to_packed_half_ptx():
    """The fp8 GEMV's HALF2 launch, as the GPU makes it (ASM on), compiles for sm_90 with its
    PTX's packed conversion and multiply-add in it: the interpreter runs an emulation, so only
    this shows that the GPU's kernel is the packed one."""
    _needs_interpreter()
    import torch

    import launch_record
    from qwen3vl_kernels.fp8 import fp8_gemv

    with launch_record.only_recording() as rec:
        for group_scale in (False, True):
            fp8_gemv(torch.empty(1, 2048, dtype=torch.bfloat16), torch.empty(5120, 2048, dtype=torch.float8_e4m3fn),
                     torch.ones(40, 16), (128, 128),
                     config={"BLOCK_N": 8, "BLOCK_K": 1024, "num_warps": 4, "HALF2": True, "GROUP_SCALE": group_scale})
    records = [{**r, "ptx_has": ["cvt.rn.f16x2.e4m3x2", "fma.rn.f16x2", "add.rn.f16x2"]}
               for r in rec.records.values() if r["consts"]["ASM"] and r["consts"]["HALF2"]]
    assert len(records) == 4, rec.records          # GROUP_SCALE, with PDL and without
    _assert_all_compile(records)


def test_bits_dense_gemm_compiles_to_integer_conversion_ptx():
    """The dense fp8 GEMM's BITS launch, as the GPU makes it (ASM on), compiles for sm_90 with the
    conversion's byte permute and three-input logic in its PTX (the interpreter runs Triton's
    integer ops instead)."""
    _needs_interpreter()
    import torch

    import launch_record
    from qwen3vl_kernels.fused_moe import dense_fp8_gemm

    with launch_record.only_recording() as rec:
        dense_fp8_gemm(torch.empty(16, 2048, dtype=torch.bfloat16), torch.empty(5120, 2048, dtype=torch.float8_e4m3fn),
                       torch.ones(40, 16), (128, 128),
                       {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 6,
                        "SPLIT_K": 4, "BITS": True})
    records = [{**r, "ptx_has": ["prmt.b32", "lop3.b32"]} for r in rec.records.values()
               if r["consts"]["ASM"] and r["consts"]["BITS"]]
    assert len(records) == 2, rec.records          # with PDL and without
    _assert_all_compile(records)


def test_dense_gemm_l2_prefetch_comes_before_the_pdl_wait():
    """The dense fp8 GEMM's L2_PREFETCH launch, as the GPU makes it (ASM and PDL on), compiles for
    sm_90 with its L2 prefetches ahead of PDL's wait in the PTX: the weights are asked for while
    the kernel before still runs (W8A16 and W8A8 (A8) at 30B's qkv and o_proj 16 and 64 rows)."""
    _needs_interpreter()
    import torch

    import launch_record
    from qwen3vl_kernels.fused_moe import dense_fp8_gemm

    base = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 6,
            "L2_PREFETCH": True}
    with launch_record.only_recording() as rec:
        for m, n, k, cfg in ((16, 5120, 2048, {"SPLIT_K": 4, "BITS": True}), (16, 2048, 4096, {"SPLIT_K": 8}),
                             (64, 5120, 2048, {"BLOCK_M": 64, "BLOCK_N": 64, "A8": True})):
            dense_fp8_gemm(torch.empty(m, k, dtype=torch.bfloat16), torch.empty(n, k, dtype=torch.float8_e4m3fn),
                           torch.ones(-(-n // 128), k // 128), (128, 128), {**base, **cfg})
    records = [{**r, "ptx_order": ["prefetch.global.L2", "griddepcontrol.wait"]} for r in rec.records.values()
               if r["name"] == "_grouped_gemm_kernel" and r["consts"]["ASM"] and r["consts"]["USE_PDL"]]
    assert len(records) == 3, rec.records
    _assert_all_compile(records)


def test_decode_attention_register_cap_reaches_the_compile():
    """A decode attention entry's "maxnreg" (attention_variants' r168 / r128) is the launch's: the
    fp8 cache's 128-token tiles at 30B's heads, 204 registers a thread uncapped on sm_90, compile
    within the cap (ptxas spills the rest; no spill limit here)."""
    _needs_interpreter()
    import torch

    import launch_record
    from qwen3vl_kernels.attention import paged_decode_attention

    q = torch.empty(64, 32, 128, dtype=torch.bfloat16)
    cache = torch.empty(2, 64 * 64, 16, 4, 128, dtype=torch.float8_e4m3fn)
    tables, lens = torch.zeros(64, 64, dtype=torch.int32), torch.full((64,), 1000, dtype=torch.int32)
    with launch_record.only_recording() as rec:
        for cap in (168, 128):
            paged_decode_attention(q, cache, tables, lens, 0.1, prefetch=False,
                                   config={"PAGES_TOKENS": 128, "num_stages": 3, "maxnreg": cap})
    records = [{**r, "max_regs": r.get("maxnreg")} for r in rec.records.values()
               if r["name"] == "_paged_decode_kernel" and r["consts"]["USE_PDL"]]
    assert sorted(r["max_regs"] or 0 for r in records) == [128, 168], records
    _assert_all_compile(records)


def h200_table_launches() -> list[dict]:
    """The launches the H200's decode tables configure (qwen3vl_kernels/configs: the fp8 GEMV, the skinny
    GEMM and its split-K entries, the fp8 dense GEMM, the MoE pair kernels, the sorted MoE path's
    decode batches) and the small decode launches that run one warp, made by the launch
    functions themselves at the tables' shapes on the CPU with launch_record.only_recording: the
    kernel variants an H200 runs, which the CPU tests' small configs do not reach."""
    import torch

    import launch_record
    from qwen3vl_kernels import fp8 as kfp8, linear, tables
    from qwen3vl_kernels.fused_moe import align_by_expert, dense_fp8_gemm, fused_moe, fused_moe_pairs, route
    from qwen3vl_kernels.rope import qkv_prep_

    name, block = "NVIDIA_H200", (128, 128)
    configs = Path(tables.__file__).parent / "configs"
    bf16, f8 = torch.bfloat16, torch.float8_e4m3fn

    def entries(table: dict):
        for nk, by_m in table.items():
            if "," not in nk:
                continue
            n, k = (int(v) for v in nk.split(","))
            for m, cfg in by_m.items():
                if isinstance(cfg, dict):
                    yield n, k, int(m), cfg

    def scales(n, k):
        return torch.ones(-(-n // block[0]), -(-k // block[1]))

    def moe_shape(f: Path) -> tuple[int, int, int]:
        shape = dict(part.split("=") for part in f.name.split(",")[:3])
        return int(shape["E"]), int(shape["N"]), int(shape["K"])

    def experts(e, inter, hidden, dt, whole=False):
        """(w13, w2, their scales or None), one expert's storage expanded to e; `whole`: each
        expert its own (contiguous, as TMA descriptors read them; never written here)."""
        w13 = torch.empty(1 if not whole else e, 2 * inter, hidden, dtype=dt).expand(e, -1, -1)
        w2 = torch.empty(1 if not whole else e, hidden, inter, dtype=dt).expand(e, -1, -1)
        if dt != f8:
            return w13, w2, None, None
        return w13, w2, scales(2 * inter, hidden).expand(e, -1, -1), scales(hidden, inter).expand(e, -1, -1)

    dense = json.loads((configs / f"fp8_dense,device={name},block=128x128.json").read_text())
    shadowed: dict[str, dict] = {}
    with launch_record.only_recording() as rec:
        gemv = json.loads((configs / f"fp8_gemv,device={name},block=128x128.json").read_text())
        for n, k, m, cfg in entries(gemv):
            args = (torch.empty(m, k, dtype=bf16), torch.empty(n, k, dtype=f8), scales(n, k), block)
            if 1 < m <= kfp8.DENSE_MAX_M and isinstance(linear.nearest_m(dense, n, k, m, None), dict):
                with launch_record.only_recording() as unused:      # fp8_linear takes the dense GEMM there
                    kfp8.fp8_gemv(*args, config=cfg)
                shadowed.update(unused.records)
            else:
                kfp8.fp8_gemv(*args, config=cfg)
        skinny = json.loads((configs / f"skinny_linear,device={name}.json").read_text())
        for n, k, m, cfg in entries(skinny):
            linear.skinny_linear(torch.empty(m, k, dtype=bf16), torch.empty(n, k, dtype=bf16), config=cfg)
        for n, k, m, cfg in entries(dense):
            dense_fp8_gemm(torch.empty(m, k, dtype=bf16), torch.empty(n, k, dtype=f8), scales(n, k), block, cfg)
        pair_tables = [(128, 768, 2048, json.loads((configs / f"fp8_pairs,device={name},block=128x128.json").read_text()))]
        for f in configs.glob(f"E=*,device={name},dtype=fp8_w8a8,block=128x128.json"):
            table = json.loads(f.read_text()).get("pairs")
            if table:
                pair_tables.append((*moe_shape(f), table))
        for e, inter, hidden, table in pair_tables:
            for m, cfg in table.items():
                w13, w2, s13, s2 = experts(e, inter, hidden, f8, whole=cfg.get("TMA"))
                ids = torch.zeros(int(m), 8, dtype=torch.int32)
                for prefetch in (False, True):
                    fused_moe_pairs(torch.empty(int(m), hidden, dtype=bf16), w13, w2, torch.ones(int(m), 8), ids, cfg,
                                    s13, s2, block, prefetch=prefetch)
        # the sorted path's decode batches (its prefill entries are compiled by the kernel tests' shapes only)
        for f in sorted(configs.glob(f"E=*,device={name}*.json")):
            e, inter, hidden = moe_shape(f)
            w13, w2, s13, s2 = experts(e, inter, hidden, f8 if "fp8_w8a8" in f.name else bf16)
            for m, cfg in json.loads(f.read_text()).items():
                if m.isdigit() and isinstance(cfg, dict) and int(m) <= kfp8.DENSE_MAX_M:
                    fused_moe(torch.empty(int(m), hidden, dtype=bf16), w13, w2, torch.ones(int(m), 8),
                              torch.zeros(int(m), 8, dtype=torch.int32), cfg, s13, s2, block)
        # the small decode launches' one-warp defaults (qwen3vl_kernels.switches.KERNEL_WARPS), 30B's shapes
        hq, hkv, d = 32, 4, 128
        for t in (1, 16, 64):
            qkv_prep_(torch.empty(t, (hq + 2 * hkv) * d, dtype=bf16), hq, hkv, torch.empty(d, dtype=bf16),
                      torch.empty(d, dtype=bf16), 1e-6, torch.empty(t, d), torch.empty(t, d),
                      torch.empty(2, 4, 16, hkv, d, dtype=bf16), torch.zeros(t, dtype=torch.long))
            route(torch.empty(t, 128), 8, True)
            align_by_expert(torch.zeros(t, 8, dtype=torch.int32), 128, 16)
    # the launches an H200 runs are compiled as launched, and may not spill (max_stack); the GEMV's
    # entries the dense GEMM's shadow are only compiled
    return ([{**r, "max_stack": 0} for r in rec.records.values()]
            + [r for key, r in shadowed.items() if key not in rec.records])


def test_the_h200_tables_launches_compile_for_sm90():
    """Every H200 table entry above, as its launch function makes it, compiles for sm_90, and
    those an H200 runs spill no registers: compiled with the specialization a launch gets (ints
    of 1 as constants, tt.divisibility for addresses and ints 16 divides), their registers are
    the GPU's (Nsight Compute on the H200: the pair kernels' 80 and 240, the row GEMV's 128; a
    compile without it gave the pair down kernel 32 and a 2.5 KB stack, and the grouped GEMM no
    pipelined loads). A table edit is otherwise first compiled, or first found spilling, on a GPU."""
    _needs_interpreter()
    records = h200_table_launches()
    assert len(records) >= 20, len(records)
    # the 30B fp8 table's one-token gate_up reads through a TMA descriptor (not the plain kernel)
    assert any(r["name"] == "_pair_gate_up_tma_kernel" for r in records)
    _assert_all_compile(records)


def main(path: str) -> int:
    try:
        import triton.backends.compiler  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as e:
        print(f"this Triton cannot compile ahead of time: {e}")
        return SKIP
    records = json.loads(Path(path).read_text())
    with ProcessPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        errors = list(pool.map(_compile_one, records, chunksize=4))
    if errors and all(e is not None and "ptxas" in e.lower() for e in errors):
        print(f"no ptxas with this Triton: {errors[0]}")
        return SKIP
    failed = [(r, e) for r, e in zip(records, errors) if e is not None]
    for r, e in failed:
        print(f"FAILED {r['module']}.{r['name']} {json.dumps(r['consts'])}: {e}")
    print(f"compiled {len(records) - len(failed)} of {len(records)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

