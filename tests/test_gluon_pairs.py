"""kernels.gluon_pairs: the fp8 MoE pair path's down kernel in Gluon, its weights asked for before
PDL's wait.

Off a GPU (Triton's interpreter runs no Gluon) the kernel is compiled for sm_90a and its PTX and
ptxas's report are checked for what it exists for: every slot's weight boxes asked for by TMA
before the wait (with PREFETCH; after it without), few registers (so its programs fit on an SM
beside gate_up's), no spills. On a GPU, its output against the plain pair down kernel and the
dequantized reference: 30B-A3B's shape and awkward ones, 1-16 tokens, another rank's experts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import gluon_pairs
from kernels.fp8 import dequantize_weight_blocks, quantize_weight_blocks

HERE = Path(__file__).resolve().parent
CUDA = torch.cuda.is_available()
HOPPER = CUDA and torch.cuda.get_device_capability()[0] == 9


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    if not gluon_pairs.available():
        pytest.skip("this Triton has no Gluon")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(HERE / "gluon_compile.py"), "pairs"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_every_down_shape_compiles_for_hopper(compiled):
    assert len(compiled) >= 4 and all("shape" in c for c in compiled)


def test_every_weight_box_is_asked_for_before_the_wait(compiled):
    for c in compiled:
        top_k, k, block_n, warps, prefetch = c["shape"]
        boxes = top_k * gluon_pairs.steps(k)
        assert c["tma"] == boxes, c
        if prefetch:
            assert c["pdl"] == ["launch_dependents", "wait"] and c["tma_before_wait"] == boxes, c
        else:           # the routing may not be final before the wait: nothing asked before it
            assert c["pdl"] == ["wait", "launch_dependents"] and c["tma_before_wait"] == 0, c


def test_a_program_holds_few_registers(compiled):
    # the point of shared memory: the plain kernel's 240 registers kept its programs off gate_up's SMs
    for c in compiled:
        if c.get("registers") is not None:
            assert c["registers"] <= 64 and c["spills"] == 0, c


def test_down_shape_ok_refuses_what_the_kernel_cannot_take():
    ok = gluon_pairs.down_shape_ok
    assert ok(768, 8, (128, 128), 8, 4) == gluon_pairs.available()
    assert ok(1536, 8, (128, 128), 8, 4) == gluon_pairs.available()        # 235B-A22B's down
    assert not ok(768, 8, (128, 64), 8, 4)          # scale blocks not 128 wide
    assert not ok(768, 8, (128, 128), 8, 8)         # fewer rows than the layout's 2 x warps
    assert not ok(768, 8, (48, 128), 32, 4)         # rows across two scale blocks
    assert not ok(760, 8, (128, 128), 8, 4)         # rows TMA cannot stride (760 bytes)
    assert not ok(1536, 8, (128, 128), 32, 4)       # 8 x 12 boxes of 32 x 128 past shared memory
    assert gluon_pairs.shared_bytes(8, 768, 8) == 8 * 6 * 128 * (8 + 4) + 64


def _experts(e, h, i, block):
    w13 = torch.randn(e, 2 * i, h) * h ** -0.5
    w2 = torch.randn(e, h, i) * i ** -0.5
    q13, s13 = (torch.stack(t).cuda() for t in zip(*(quantize_weight_blocks(w, block) for w in w13)))
    q2, s2 = (torch.stack(t).cuda() for t in zip(*(quantize_weight_blocks(w, block) for w in w2)))
    d13 = torch.stack([dequantize_weight_blocks(q, s, block) for q, s in zip(q13.cpu(), s13.cpu())]).cuda()
    d2 = torch.stack([dequantize_weight_blocks(q, s, block) for q, s in zip(q2.cpu(), s2.cpu())]).cuda()
    return q13, s13, q2, s2, d13, d2


def _rel(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.mark.skipif(not HOPPER or not gluon_pairs.available(), reason="needs a Hopper GPU and Gluon")
@pytest.mark.parametrize("m,e,h,i,block_n,warps", [(1, 128, 2048, 768, 8, 4), (1, 128, 2048, 768, 16, 8),
                                                   (3, 16, 384, 640, 8, 4), (16, 32, 256, 1536, 8, 4),
                                                   (5, 8, 200, 336, 8, 4)])
@pytest.mark.parametrize("prefetch", [True, False])
def test_gluon_down_is_the_plain_kernels_product(m, e, h, i, block_n, warps, prefetch):
    """The same pair path with down in Gluon: against the plain kernel (the same float32 products,
    summed in another order) and the dequantized reference; N (200) ending mid-program, K (336,
    640) ending mid-box."""
    from kernels.fused_moe import fused_moe_pairs, fused_moe_reference
    from qwen3vl_backend.layers.moe import route

    torch.manual_seed(m * 7 + i)
    block = (128, 128)
    q13, s13, q2, s2, d13, d2 = _experts(e, h, i, block)
    x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
    w, ids = route(torch.randn(m, e, device="cuda"), 8, True)
    cfg = {"BLOCK_N": 16, "BLOCK_K": 128, "num_warps": 4, "DOWN_BLOCK_N": block_n, "DOWN_BLOCK_K": 128,
           "down_warps": warps}
    plain = fused_moe_pairs(x, q13, q2, w, ids, cfg, s13, s2, block, prefetch=prefetch)
    assert gluon_pairs.down_ok(q2, 8, block, block_n, warps)
    got = fused_moe_pairs(x, q13, q2, w, ids, {**cfg, "GLUON_DOWN": True}, s13, s2, block, prefetch=prefetch)
    assert _rel(got, plain) < 1e-2
    assert _rel(got, fused_moe_reference(x.float(), d13, d2, w, ids)) < 3e-2
    again = fused_moe_pairs(x, q13, q2, w, ids, {**cfg, "GLUON_DOWN": True}, s13, s2, block, prefetch=prefetch)
    assert torch.equal(got, again)


@pytest.mark.skipif(not HOPPER or not gluon_pairs.available(), reason="needs a Hopper GPU and Gluon")
def test_gluon_down_never_reads_another_ranks_experts():
    """Expert parallelism's id E: no scale row (NaNs sit where it would be) and no weights; a token
    whose slots are all elsewhere comes out zero."""
    from kernels.fused_moe import fused_moe_pairs, fused_moe_reference

    e, h, i, block = 6, 256, 384, (128, 128)
    q13, s13, q2, s2, d13, d2 = _experts(e, h, i, block)
    s13, s2 = (torch.cat([t, torch.full_like(t[:1], float("nan"))])[:e] for t in (s13, s2))
    x = torch.randn(3, h, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(3, 8, device="cuda")
    ids = torch.tensor([[0, 5, e, 1, 2, e, 3, 4], [e] * 8, [3, 1, 2, 0, 4, 5, e, e]], dtype=torch.int32,
                       device="cuda")
    cfg = {"BLOCK_N": 16, "BLOCK_K": 128, "num_warps": 4, "DOWN_BLOCK_N": 8, "DOWN_BLOCK_K": 128, "down_warps": 4,
           "GLUON_DOWN": True}
    got = fused_moe_pairs(x, q13, q2, w, ids, cfg, s13, s2, block)
    keep = ids < e
    want = fused_moe_reference(x.float(), d13, d2, w * keep, torch.where(keep, ids, 0))
    assert got.isfinite().all() and not got[1].any()
    assert _rel(got, want) < 3e-2
