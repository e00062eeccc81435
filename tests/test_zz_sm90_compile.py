"""Kernels compiled for an H100/H200 (sm_90: Triton's front end, its passes and ptxas, which Triton
ships) on a machine without a GPU. The interpreter runs a kernel's Python and misses what only
the compiler refuses: a variable whose type changes in a loop, code compiled past a return in a
constexpr branch. An integer-conversion variant of the pair kernels (INT_CVT at dbb55de,
measured slower and gone) failed so on the H200 after passing every interpreter test; both
tests here failed on it.

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
    src = ASTSource(fn=fn, signature={**rec["types"], **{k: "constexpr" for k in rec["consts"]}},
                    constexprs=rec["consts"])
    try:
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": rec["num_warps"], "num_stages": rec["num_stages"]})
    except Exception as e:                   # the compiler's own errors are many types
        lines = [line for line in str(e).splitlines() if line.strip()]
        return f"{type(e).__name__}: {lines[-1] if lines else e}"
    return None if kernel.asm.get("cubin") else "no sm_90 binary"


def pair_kernel_records() -> list[dict]:
    """The MoE pair kernels, fp8 or not, GROUP_SCALE and PREFETCH, with PDL: run alone, this file
    still compiles them."""
    i32 = "i32"
    out = []
    for fp8, group_scale, prefetch in itertools.product([False, True], repeat=3):
        w = "*fp8e4nv" if fp8 else "*bf16"
        common = dict(HAS_SCALE=fp8, BN=128, BK=128, USE_PDL=True, GROUP_SCALE=group_scale, PREFETCH=prefetch)
        out.append({"module": "kernels.fused_moe", "name": "_pair_gate_up_kernel", "num_warps": 4, "num_stages": 3,
                    "types": dict(x_ptr="*bf16", w_ptr=w, ids_ptr="*i32", act_ptr="*bf16", s_ptr="*fp32", inter=i32,
                                  K=i32, top_k=i32, num_experts=i32, stride_xm=i32, stride_we=i32, stride_wn=i32,
                                  stride_am=i32, stride_se=i32, stride_sn=i32),
                    "consts": dict(BLOCK_N=8, BLOCK_K=256, **common)})
        out.append({"module": "kernels.fused_moe", "name": "_pair_down_kernel", "num_warps": 4, "num_stages": 1,
                    "types": dict(act_ptr="*bf16", w_ptr=w, ids_ptr="*i32", weights_ptr="*fp32", out_ptr="*bf16",
                                  s_ptr="*fp32", N=i32, K=i32, top_k=i32, num_experts=i32, stride_am=i32,
                                  stride_we=i32, stride_wn=i32, stride_om=i32, stride_se=i32, stride_sn=i32),
                    "consts": dict(TOP_K_PAD=8, BLOCK_N=8, BLOCK_K=256, **common)})
    return out


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


def test_moe_pair_kernels_compile_for_sm90():
    code, log = _run_child(pair_kernel_records())
    assert code == 0 and "compiled 16 of 16" in log, log


def test_every_recorded_launch_compiles_for_sm90():
    """Each distinct launch (kernel, argument types, constexprs, warps, stages) the interpreter
    ran in this session's earlier tests compiles for sm_90."""
    import launch_record

    records = [r for r in launch_record.RECORDS.values()
               if not any(str(v).startswith("?") for v in [*r["types"].values(), *r["consts"].values()])]
    if not records:
        pytest.skip("no interpreted launches recorded before this test (run with the kernel tests, on a CPU)")
    code, log = _run_child(records)
    assert code == 0 and f"compiled {len(records)} of {len(records)}" in log, log


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
