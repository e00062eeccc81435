"""Compiles kernels for Hopper (sm_90a) on a machine without a GPU, without launching them, and
prints one line per kernel: "OK name | the order of its global loads, stores and PDL controls" or
"FAIL name: error". Run without TRITON_INTERPRET (tests/test_hopper_compile.py does), so the
compiler sees what the interpreter never checks (it once hid a return inside a constexpr branch)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET"):
    raise SystemExit("run without TRITON_INTERPRET: the interpreter's functions do not compile")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from qwen3vl_kernels.attention import _paged_decode_kernel  # noqa: E402
from qwen3vl_kernels.fused_moe import (_grouped_gemm_kernel, _norm_route_kernel, _pair_down_kernel,  # noqa: E402
                               _pair_gate_up_kernel)
from qwen3vl_kernels.linear import _skinny_kernel  # noqa: E402
from qwen3vl_kernels.rope import _qkv_prep_kernel  # noqa: E402
from qwen3vl_kernels.sample import _lse_kernel, _sample_parts_kernel, _sample_pick_kernel, _sample_select_kernel  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
MARKS = ("ld.global", "st.global", "atom.global", "griddepcontrol.launch_dependents", "griddepcontrol.wait")


def sequence(ptx: str) -> str:
    """The kernel's global loads, stores, atomics and PDL controls in program order, runs merged."""
    runs: list[list] = []
    for line in ptx.splitlines():
        words = line.strip().split()
        op = words[1] if words and words[0].startswith("@") and len(words) > 1 else (words[0] if words else "")
        mark = next((m for m in MARKS if op.rstrip(";").startswith(m)), None)
        if mark is None:
            continue
        if runs and runs[-1][0] == mark:
            runs[-1][1] += 1
        else:
            runs.append([mark, 1])
    return " > ".join(m if n == 1 else f"{m} x{n}" for m, n in runs)


def compile_one(name: str, fn, pointers: dict, floats: tuple = (), constexprs: dict | None = None) -> str:
    """Each argument typed: a pointer from `pointers`, float32 if in `floats`, else int32."""
    constexprs = constexprs or {}
    signature, values = {}, {}
    for p in fn.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            values[(fn.arg_names.index(p.name),)] = constexprs.get(p.name, p.default)
        else:
            signature[p.name] = pointers.get(p.name, "fp32" if p.name in floats else "i32")
    try:
        compiled = triton.compile(ASTSource(fn, signature, values), target=HOPPER)
    except Exception as e:  # noqa: BLE001 - every failure is a line of the report
        return f"FAIL {name}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    return f"OK {name} | {sequence(compiled.asm['ptx'])}"


BF, F32, I32, FP8 = "*bf16", "*fp32", "*i32", "*fp8e4nv"
ATTENTION = dict(q_ptr=BF, cache_ptr=BF, block_tables_ptr=I32, context_lens_ptr=I32, out_ptr=F32, m_ptr=F32,
                 l_ptr=F32, qw_ptr=BF, kw_ptr=BF, cos_ptr=F32, sin_ptr=F32, slot_ptr="*i64")
DECODE = dict(HEAD_DIM=128, BLOCK_SIZE=16, PAGES=4, GROUP_PAD=16, NUM_SPLITS=16, USE_PDL=True)
SKINNY = dict(x_ptr=BF, w_ptr=FP8, b_ptr=BF, y_ptr=BF, s_ptr=F32, res_ptr=BF, nw_ptr=BF, new_res_ptr=BF)
DOWN = dict(act_ptr=BF, w_ptr=FP8, ids_ptr=I32, weights_ptr=F32, out_ptr=BF, s_ptr=F32)
NORM_ROUTE = dict(x_ptr=BF, res_ptr=BF, nw_ptr=BF, h_ptr=BF, new_res_ptr=BF, gw_ptr=BF, logits_ptr=F32,
                  fixed_ptr=F32, weights_ptr=F32, ids_ptr=I32, count_ptr=I32)
GROUPED = dict(a_ptr=FP8, b_ptr=FP8, c_ptr=BF, weights_ptr=F32, sorted_ids_ptr=I32, expert_ids_ptr=I32,
               num_padded_ptr=I32, s_ptr=F32, as_ptr=F32, ws_ptr=F32, count_ptr=I32)

KERNELS = [
    ("paged_decode", _paged_decode_kernel, ATTENTION, ("scale", "eps"), DECODE),
    ("paged_decode PREFETCH", _paged_decode_kernel, ATTENTION, ("scale", "eps"), {**DECODE, "PREFETCH": True}),
    ("paged_decode PREP", _paged_decode_kernel, ATTENTION, ("scale", "eps"), {**DECODE, "PREP": True}),
    ("paged_decode PREFETCH PREP", _paged_decode_kernel, ATTENTION, ("scale", "eps"),
     {**DECODE, "PREFETCH": True, "PREP": True}),
    ("paged_decode fp8 cache", _paged_decode_kernel, {**ATTENTION, "cache_ptr": FP8}, ("scale", "eps"),
     {**DECODE, "F16_DOT": True}),
    ("paged_decode PREFETCH fp8 cache", _paged_decode_kernel, {**ATTENTION, "cache_ptr": FP8}, ("scale", "eps"),
     {**DECODE, "PREFETCH": True, "F16_DOT": True}),
    ("qkv_prep fp8 cache", _qkv_prep_kernel, dict(qkv_ptr=BF, qw_ptr=BF, kw_ptr=BF, cos_ptr=F32, sin_ptr=F32,
                                                  cache_ptr=FP8, slot_ptr="*i64"), ("eps",),
     dict(HEAD_DIM=128, HALF=64, BLOCK_T=1, USE_PDL=True)),
    ("skinny fp8 NORM", _skinny_kernel, SKINNY, ("eps",),
     dict(HAS_BIAS=False, M_PAD=1, BLOCK_N=8, BLOCK_K=512, HAS_SCALE=True, GROUP_SCALE=True, USE_PDL=True, NORM=True,
          K_PAD=2048)),
    ("skinny bf16 NORM", _skinny_kernel, {**SKINNY, "w_ptr": BF}, ("eps",),
     dict(HAS_BIAS=False, M_PAD=1, BLOCK_N=2, BLOCK_K=1024, USE_PDL=True, NORM=True, K_PAD=2048)),
    ("pair gate_up PREFETCH", _pair_gate_up_kernel, dict(x_ptr=BF, w_ptr=FP8, ids_ptr=I32, act_ptr=BF, s_ptr=F32), (),
     dict(BLOCK_N=8, BLOCK_K=256, HAS_SCALE=True, USE_PDL=True, PREFETCH=True)),
    ("pair down PREFETCH", _pair_down_kernel, DOWN, (),
     dict(TOP_K_PAD=8, BLOCK_N=8, BLOCK_K=256, HAS_SCALE=True, GROUP_SCALE=True, USE_PDL=True, PREFETCH=True)),
    ("norm_route PREFETCH", _norm_route_kernel, NORM_ROUTE, ("eps",),
     dict(TOP_K=8, TOP_K_PAD=8, RENORMALIZE=True, FIXED=True, BLOCK_E=4, BLOCK_D=2048, E_PAD=128, USE_PDL=True,
          PREFETCH=True)),
    ("grouped DENSE SPLIT_K W8A8", _grouped_gemm_kernel, GROUPED, (),
     dict(A_ROWS_ARE_PAIRS=True, MUL_WEIGHT=False, FUSE_SILU=False, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=8,
          SCALE_MODE=2, A_SCALED=True, USE_PDL=True, DENSE=True, SPLIT_K=8)),
    ("sample parts", _sample_parts_kernel, dict(x_ptr=BF, rows_ptr=F32, max_ptr=F32, sum_ptr=F32), (),
     dict(BLOCK=4096, PARTS=64)),
    ("sample select", _sample_select_kernel, dict(x_ptr=BF, rows_ptr=F32, max_ptr=F32, keys_ptr="*i64"), (),
     dict(BLOCK=4096, KP=32, PARTS=64)),
    ("sample log-sum-exp", _lse_kernel, dict(max_ptr=F32, sum_ptr=F32, out_ptr=F32), (), dict(PARTS=64)),
    ("sample pick", _sample_pick_kernel, dict(keys_ptr="*i64", max_ptr=F32, sum_ptr=F32, rows_ptr=F32, u_ptr=F32,
                                              out_ptr="*i64"), (), dict(KP=32, PARTS=64)),
    ("grouped DENSE SPLIT_K bf16 (the router)", _grouped_gemm_kernel, {**GROUPED, "a_ptr": BF, "b_ptr": BF}, (),
     dict(A_ROWS_ARE_PAIRS=True, MUL_WEIGHT=False, FUSE_SILU=False, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1,
          SCALE_MODE=0, USE_PDL=True, DENSE=True, SPLIT_K=16)),
]

if __name__ == "__main__":
    for name, fn, pointers, floats, constexprs in KERNELS:
        print(compile_one(name, fn, pointers, floats, constexprs), flush=True)
