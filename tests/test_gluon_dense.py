"""qwen3vl_kernels.gluon_dense: the decode-size W8A8 GEMM in Gluon.

Off a GPU (Triton's interpreter runs no Gluon) the kernel is compiled for sm_90a and its PTX and
ptxas's report are checked for what it exists for: each K step's wgmma left in flight while the
step before is scaled (one `wait_group 1` a step), no wgmma serialized by ptxas, no spills, the
weight tiles asked for before PDL's wait. On a GPU, its products against the same quantization in
torch, at 30B's and 235B's shapes and awkward ones, split over K or not."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen3vl_kernels import gluon_dense
from qwen3vl_kernels.fp8 import dequantize_weight_blocks, quantize_weight_blocks, w8a8_block_linear_reference

HERE = Path(__file__).resolve().parent
CUDA = torch.cuda.is_available()
HOPPER = CUDA and torch.cuda.get_device_capability()[0] == 9


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    if not gluon_dense.available():
        pytest.skip("this Triton has no Gluon")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(HERE / "gluon_compile.py")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_every_launch_shape_compiles_for_hopper(compiled):
    assert len(compiled) >= 5 and all("shape" in c for c in compiled)


def test_each_step_overlaps_the_last_ones_scaling(compiled):
    for c in compiled:
        block_n, bt, stages, steps, split, warps = c["shape"]
        assert c["mma"] == 4 * steps, c                   # four k32 wgmmas a 128-wide step
        assert c["wait1"] == steps - 1 and c["wait0"] == 1, c
        if c.get("registers") is not None:                # Triton's ptxas was there to ask
            assert not c["serialized"], c
            assert c["spills"] == 0, c


def test_weights_are_asked_for_before_the_pdl_wait(compiled):
    for c in compiled:
        block_n, bt, stages, steps, split, warps = c["shape"]
        assert c["pdl"] == ["launch_dependents", "wait"], c
        # then the rows' tiles, also by TMA
        assert c["tma_before_wait"] == min(stages, steps) and c["tma"] == 2 * steps, c


def test_steps_split_leaves_no_program_without_a_step():
    for k in (128, 640, 2048, 4096, 4000):
        steps = -(-k // 128)
        for split in (1, 2, 3, 4, 8, 16, 64):
            per, launched = gluon_dense.steps_split(k, split)
            assert launched <= split and per * launched >= steps and per * (launched - 1) < steps, (k, split)


def test_shared_memory_counts_the_ring():
    cfg = {"BLOCK_N": 64, "SPLIT_K": 1, "num_stages": 16}
    # qkv at 16 rows, all of K's 16 steps in flight: 16 x ((64 + 16) x 128 + 8)
    assert gluon_dense.shared_bytes(16, 2048, cfg) == 16 * ((64 + 16) * 128 + 8)
    assert gluon_dense.fits(64, 2048, cfg)                    # two programs of 32 rows
    assert gluon_dense.shared_bytes(64, 2048, {**cfg, "num_stages": 32}) == gluon_dense.shared_bytes(64, 2048, cfg)
    assert not gluon_dense.fits(64, 4096, {**cfg, "num_stages": 32, "BLOCK_N": 128})
    assert gluon_dense.fits(64, 4096, {**cfg, "SPLIT_K": 2, "num_stages": 8})


def test_launch_ok_refuses_what_the_kernel_cannot_take():
    assert gluon_dense.launch_ok(64, 5120, 2048, (128, 128), 64) == gluon_dense.available()
    assert not gluon_dense.launch_ok(65, 5120, 2048, (128, 128), 64)          # rows past one wgmma side x 2
    assert not gluon_dense.launch_ok(16, 96, 256, (32, 64), 64)               # K blocks not 128 wide
    assert not gluon_dense.launch_ok(16, 5120, 2048, (128, 128), 32)          # under a warpgroup's 64 rows
    assert not gluon_dense.launch_ok(16, 5120, 2056, (128, 128), 64)          # rows TMA cannot stride


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="wgmma and TMA: a Hopper GPU")
@pytest.mark.parametrize("m,n,k", [(1, 5120, 2048), (5, 2048, 4096), (16, 5120, 2048), (33, 4608, 4096),
                                   (64, 5120, 2048), (64, 2048, 4096), (7, 320, 640), (40, 200, 384),
                                   (100, 4608, 4096)])
def test_gluon_w8a8_is_the_w8a8_product(m, n, k):
    """Against the same per-token, per-group quantization in torch (float32): within the bf16
    rounding of the output, at every launch shape the sweep tries; split-K gives the same bits
    twice (its partials summed in split order). 100 rows are past the kernel: the entry's other
    keys launch the grouped GEMM (a Gluon shape's deep ring once reached it there and failed)."""
    from qwen3vl_kernels.fused_moe import dense_fp8_gemm

    block = (128, 128)
    torch.manual_seed(m * 7 + n)
    x = (torch.randn(m, k) * torch.logspace(-1, 1, k)).cuda().bfloat16()
    q, s = (t.cuda() for t in quantize_weight_blocks(torch.randn(n, k) * k ** -0.5, block))
    want = w8a8_block_linear_reference(x.float(), q, s, block)
    shapes = ((64, 1, 4, 4), (64, 2, 6, 4), (64, 4, 4, 4), (128, 2, 4, 8), (64, 8, 2, 4), (64, 1, 16, 4),
              (128, 1, 8, 8))
    for block_n, split, stages, warps in shapes:
        glu = {"BLOCK_N": block_n, "SPLIT_K": split, "num_stages": stages, "num_warps": warps}
        cfg = {"GLUON": glu, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4,
               "num_stages": 4}
        if not gluon_dense.fits(m, k, glu):
            continue
        got = dense_fp8_gemm(x, q, s, block, cfg)
        assert got.shape == (m, n) and got.dtype == torch.bfloat16
        if m <= gluon_dense.MAX_ROWS:                     # else the grouped GEMM's W8A16 launch: below
            err = ((got.float() - want).norm() / want.norm()).item()
            assert err < 4e-3, (cfg, err)
        torch.testing.assert_close(dense_fp8_gemm(x, q, s, block, cfg), got, rtol=0, atol=0)
    deq = x.float() @ dequantize_weight_blocks(q, s, block).T
    assert ((got.float() - deq).norm() / deq.norm()).item() < 6e-2
