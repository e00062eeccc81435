"""Two launches each of the pair kernels at 30B-A3B-FP8's shape, plain (the table's) then TMA,
for Nsight Compute (next-lease.sh ncu): ncu -k regex:_pair python -m benchmarks.variants.pair_tma_ncu"""
import torch

from benchmarks.common import fp8_experts
from kernels.fused_moe import fused_moe_pairs, pair_config
from qwen3vl_backend.layers.moe import route

E, H, INTER, A, BLOCK = 128, 2048, 768, 8, (128, 128)
torch.manual_seed(0)
w13 = torch.randn(E, 2 * INTER, H, device="cuda", dtype=torch.bfloat16) * H ** -0.5
w2 = torch.randn(E, H, INTER, device="cuda", dtype=torch.bfloat16) * INTER ** -0.5
q13, s13, q2, s2 = fp8_experts(w13, w2, BLOCK)
x = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)
base = pair_config(E, INTER, H, 1, x.device, BLOCK)
for patch in ({}, {"TMA": True, "num_stages": 4, "DOWN_TMA": True, "down_stages": 3}):
    for _ in range(2):
        fused_moe_pairs(x, q13, q2, *route(torch.randn(1, E, device="cuda"), A, True), {**base, **patch}, s13, s2, BLOCK)
torch.cuda.synchronize()
