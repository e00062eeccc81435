"""kernels.gluon_moe: the fp8 MoE's sorted path at decode batches in Gluon.

Off a GPU (Triton's interpreter runs no Gluon) the kernel is compiled for sm_90a and its PTX and
ptxas's report are checked for what it exists for: each K step's products left in flight while
the step before is scaled (gate_up: two a step, one `wait_group 2` a step; down: one, `wait_group
1`), no wgmma serialized by ptxas, no spills, and only the weight tiles asked for before PDL's
wait. The rows' quantize in sorted order runs in the interpreter against the per-token launch on
the gathered rows, bit for bit. On a GPU, fused_moe through it against the grouped GEMM's W8A8
path and the same quantization in torch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import gluon_moe
from kernels.fp8 import quantize_launch, quantize_sorted_rows, quantize_weight_blocks

HERE = Path(__file__).resolve().parent
CUDA = torch.cuda.is_available()
HOPPER = CUDA and torch.cuda.get_device_capability()[0] == 9


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    if not gluon_moe.available():
        pytest.skip("this Triton has no Gluon")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(HERE / "gluon_compile.py"), "--moe"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_both_gemms_compile_for_hopper(compiled):
    shapes = [c["shape"] for c in compiled]
    assert any(s[3] for s in shapes) and any(not s[3] for s in shapes)


def test_each_step_overlaps_the_last_ones_scaling(compiled):
    for c in compiled:
        block_n, stages, steps, fuse_silu, warps = c["shape"]
        tiles = 2 if fuse_silu else 1
        assert c["mma"] == 4 * tiles * steps, c           # four k32 wgmmas a tile and 128-wide step
        # one wait a step for the step before, leaving this step's products running; one at the end
        assert c[f"wait{tiles}"] == steps - 1 and c["wait0"] == 1, c
        assert c[f"wait{3 - tiles}"] == 0, c
        if c.get("registers") is not None:
            assert not c["serialized"], c
            assert c["spills"] == 0, c


def test_weights_only_are_asked_for_before_the_pdl_wait(compiled):
    for c in compiled:
        block_n, stages, steps, fuse_silu, warps = c["shape"]
        tiles = 2 if fuse_silu else 1
        assert c["pdl"] == ["launch_dependents", "wait"], c
        assert c["tma_before_wait"] == tiles * stages, c              # the rows' tiles after the wait
        assert c["tma"] == (tiles + 1) * steps, c
        assert c["loads_before_wait"] == 2, c                         # the block's expert, the padded total


def test_launch_ok_refuses_what_the_kernels_cannot_take():
    cfg = {"BLOCK_N": 64, "num_stages": 4, "num_warps": 4}
    assert gluon_moe.launch_ok(768, 2048, (128, 128), cfg, 16) == gluon_moe.available()
    assert not gluon_moe.launch_ok(768, 2048, (128, 128), cfg, 32)             # 16-row blocks only
    assert not gluon_moe.launch_ok(768, 2048, (64, 128), cfg, 16)              # 128 x 128 scale blocks
    assert not gluon_moe.launch_ok(96, 2048, (128, 128), cfg, 16)              # BLOCK_N not dividing I
    assert not gluon_moe.launch_ok(768, 2048, (128, 128), {**cfg, "BLOCK_N": 32}, 16)
    assert not gluon_moe.launch_ok(768, 2048, (128, 128), {**cfg, "num_stages": 16}, 16)   # gate_up's ring
    assert gluon_moe.launch_ok(768, 2048, (128, 128), {**cfg, "DOWN": {"BLOCK_N": 128}}, 16) == gluon_moe.available()
    assert not gluon_moe.launch_ok(768, 2040, (128, 128), {**cfg, "DOWN": {"BLOCK_N": 128}}, 16)


def test_shared_bytes_count_both_tiles_of_gate_up():
    cfg = {"BLOCK_N": 64, "num_stages": 4}
    assert gluon_moe.shared_bytes(2048, cfg, True) == 4 * ((2 * 64 + 16) * 128 + 8)
    assert gluon_moe.shared_bytes(768, cfg, False) == 4 * ((64 + 16) * 128 + 8)
    assert gluon_moe.shared_bytes(256, cfg, False) == 2 * ((64 + 16) * 128 + 8)     # no more stages than steps


def _sorted(ids: torch.Tensor, num_experts: int):
    from kernels.fused_moe import align_by_expert_reference

    return align_by_expert_reference(ids, num_experts, gluon_moe.BLOCK_T)


@pytest.mark.parametrize("m,k,top_k", [(5, 256, 2), (16, 384, 8), (3, 200, 4)])
def test_sorted_rows_are_the_gathered_tokens_quantized(m, k, top_k):
    """Row r below the padded total: token sorted_ids[r] // top_k's row, quantized as the per-token
    launch quantizes it (bit for bit: both launches on this device), zeros for padding rows;
    without ids, x's own rows."""
    torch.manual_seed(m)
    x = torch.randn(m, k) * torch.logspace(-2, 1, k)
    ids = torch.stack([torch.randperm(12)[:top_k] for _ in range(m)]).int()
    sorted_ids, _, total = _sorted(ids, 12)
    rows = sorted_ids.numel()
    q, s = quantize_sorted_rows(x, 128, rows, total, sorted_ids, top_k, m * top_k)
    t = int(total)
    pair = sorted_ids[:t].long()
    src = torch.where(pair < m * top_k, pair // top_k, 0)
    want = torch.where((pair < m * top_k)[:, None], x[src], 0.0)
    wq, ws = quantize_launch(want, 128, False, False)
    assert q.shape == (rows, k) and s.shape == (rows, -(-k // 128))
    assert torch.equal(q[:t].view(torch.uint8), wq.view(torch.uint8)) and torch.equal(s[:t], ws)
    assert (pair >= m * top_k).any()                          # padding rows were among them: zeros
    assert (q[:t][pair >= m * top_k].float() == 0).all()
    # without ids: row r is x's row r (down's rows, already in sorted order)
    y = torch.randn(rows, k)
    q2, s2 = quantize_sorted_rows(y, 128, rows, total)
    wq2, ws2 = quantize_launch(y[:t], 128, False, False)
    assert torch.equal(q2[:t].view(torch.uint8), wq2.view(torch.uint8)) and torch.equal(s2[:t], ws2)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="wgmma and TMA: a Hopper GPU")
@pytest.mark.parametrize("m", [2, 5, 16, 33, 64, 128])
@pytest.mark.parametrize("glu", [{"BLOCK_N": 64, "num_stages": 4, "num_warps": 4},
                                 {"BLOCK_N": 128, "num_stages": 3, "num_warps": 8, "DOWN": {"BLOCK_N": 64,
                                                                                           "num_stages": 6,
                                                                                           "num_warps": 4}}])
def test_gluon_moe_is_the_grouped_gemms_w8a8_path(m, glu, monkeypatch):
    """30B's experts (E 128, H 2048, I 768), uniform routing: through kernels.gluon_moe against the
    grouped GEMM's W8A8 launch on the same config (both quantize x and SiLU * up per token and
    group, so within a few bf16 roundings of each other) and within e4m3's error of the
    dequantized product; the same bits twice."""
    from kernels.fp8 import dequantize_weight_blocks
    from kernels.fused_moe import fused_moe, fused_moe_reference
    from qwen3vl_backend.layers.moe import route

    monkeypatch.setenv("QWEN3VL_W8A8_MIN_M", "1")
    e, h, inter, top_k, block = 128, 2048, 768, 8, (128, 128)
    torch.manual_seed(m)
    q13, s13 = (torch.stack(t).cuda() for t in zip(*(quantize_weight_blocks(torch.randn(2 * inter, h) * h ** -0.5,
                                                                           block) for _ in range(e))))
    q2, s2 = (torch.stack(t).cuda() for t in zip(*(quantize_weight_blocks(torch.randn(h, inter) * inter ** -0.5,
                                                                         block) for _ in range(e))))
    x = (torch.randn(m, h) * torch.logspace(-1, 1, h)).cuda().bfloat16()
    w, ids = route(torch.randn(m, e).cuda(), top_k, True)
    base = {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 3,
            "SWAP_AB": True}
    got = fused_moe(x, q13, q2, w, ids, {**base, "GLUON": glu}, w13_scale=s13, w2_scale=s2, block=block)
    grouped = fused_moe(x, q13, q2, w, ids, base, w13_scale=s13, w2_scale=s2, block=block)
    assert got.shape == (m, h) and got.dtype == torch.bfloat16
    err = ((got.float() - grouped.float()).norm() / grouped.float().norm()).item()
    assert err < 1e-2, err
    d13 = torch.stack([dequantize_weight_blocks(q13[i], s13[i], block) for i in range(e)])
    d2 = torch.stack([dequantize_weight_blocks(q2[i], s2[i], block) for i in range(e)])
    want = fused_moe_reference(x.float(), d13, d2, w, ids)
    assert ((got.float() - want).norm() / want.norm()).item() < 6e-2
    again = fused_moe(x, q13, q2, w, ids, {**base, "GLUON": glu}, w13_scale=s13, w2_scale=s2, block=block)
    torch.testing.assert_close(again, got, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="wgmma and TMA: a Hopper GPU")
def test_gluon_moe_skips_another_ranks_experts(monkeypatch):
    """Expert parallelism: ids equal to E are another rank's; their blocks (the sentinel expert's)
    do nothing and the combine skips them, as the grouped path does."""
    from kernels.fused_moe import fused_moe
    from qwen3vl_backend.layers.moe import route

    monkeypatch.setenv("QWEN3VL_W8A8_MIN_M", "1")
    e, h, inter, top_k, block, m = 64, 2048, 768, 8, (128, 128), 16
    torch.manual_seed(3)
    q13, s13 = (torch.stack(t).cuda() for t in zip(*(quantize_weight_blocks(torch.randn(2 * inter, h) * h ** -0.5,
                                                                           block) for _ in range(e))))
    q2, s2 = (torch.stack(t).cuda() for t in zip(*(quantize_weight_blocks(torch.randn(h, inter) * inter ** -0.5,
                                                                         block) for _ in range(e))))
    x = torch.randn(m, h).cuda().bfloat16()
    w, ids = route(torch.randn(m, 2 * e).cuda(), top_k, True)
    ids = torch.where(ids >= e, torch.full_like(ids, e), ids)          # the other half: another rank's
    base = {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 3}
    glu = {"BLOCK_N": 64, "num_stages": 4, "num_warps": 4}
    got = fused_moe(x, q13, q2, w, ids, {**base, "GLUON": glu}, w13_scale=s13, w2_scale=s2, block=block,
                    sentinel=True)
    grouped = fused_moe(x, q13, q2, w, ids, base, w13_scale=s13, w2_scale=s2, block=block, sentinel=True)
    err = ((got.float() - grouped.float()).norm() / grouped.float().norm()).item()
    assert err < 1e-2, err
