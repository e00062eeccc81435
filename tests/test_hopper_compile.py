"""The kernels compile for Hopper (sm_90a) here, without a GPU, and their PDL order holds: a
PREFETCH variant loads before it waits for the kernel before, a plain one waits first. The
interpreter (every other CPU test) checks neither: it once hid a kernel that failed to compile,
and a misplaced wait would only show on a GPU, as a stale read."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def compiled() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(HERE / "hopper_compile.py")], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("OK ", "FAIL "))]
    if lines and all("ptxas" in line and "FAIL" in line for line in lines):
        pytest.skip(f"no Hopper toolchain in this Triton: {lines[0]}")
    out = {}
    for line in lines:
        status, rest = line.split(" ", 1)
        name, _, seq = rest.partition(" | ") if status == "OK" else (rest, "", "")
        out[name.split(":")[0]] = seq if status == "OK" else "FAIL " + rest
    return out


def first(seq: str, mark: str) -> int:
    marks = [part.split(" x")[0] for part in seq.split(" > ")]
    return marks.index(mark) if mark in marks else len(marks)


def test_every_kernel_compiles(compiled):
    assert len(compiled) >= 12
    failed = {name: seq for name, seq in compiled.items() if seq.startswith("FAIL")}
    assert not failed, failed


@pytest.mark.parametrize("name", ["paged_decode PREFETCH", "paged_decode PREFETCH PREP",
                                  "paged_decode PREFETCH fp8 cache", "pair down PREFETCH",
                                  "norm_route PREFETCH", "skinny fp8 NORM", "skinny bf16 NORM"])
def test_prefetching_kernels_load_before_they_wait(compiled, name):
    seq = compiled[name]
    assert first(seq, "ld.global") < first(seq, "griddepcontrol.wait") < len(seq.split(" > ")), seq


@pytest.mark.parametrize("name", ["paged_decode", "paged_decode PREP", "paged_decode fp8 cache",
                                  "qkv_prep fp8 cache",
                                  "grouped DENSE SPLIT_K W8A8"])
def test_plain_kernels_wait_before_they_touch_memory(compiled, name):
    seq = compiled[name]
    assert first(seq, "griddepcontrol.wait") < min(first(seq, "ld.global"), first(seq, "st.global")), seq


def test_gate_up_lets_down_launch_only_after_its_wait(compiled):
    seq = compiled["pair gate_up PREFETCH"]
    assert first(seq, "griddepcontrol.wait") < first(seq, "griddepcontrol.launch_dependents"), seq
