"""Checks the ViT varlen kernel at the real shape on a GPU, split and padded head dim, one process each.

    python -m benchmarks.debug_varlen
"""

import subprocess
import sys

CHECK = """
import torch, kernels.varlen_attention as va
from qwen3vl_backend.layers.attention import varlen_attention_torch
va.SPLIT_HEAD_DIM = {split}
for n in (70, 784, 3520):
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(n, 16, 72, device="cuda", dtype=dtype) for _ in range(3))
        out = va.varlen_attention(q, k, v, [0, n], 72 ** -0.5)
        ref = varlen_attention_torch(q, k, v, [0, n], 72 ** -0.5)
        torch.cuda.synchronize()
        print("split", {split}, n, dtype, float((out.float() - ref.float()).norm() / ref.float().norm()), flush=True)
"""

if __name__ == "__main__":
    for split in (True, False):
        r = subprocess.run([sys.executable, "-c", CHECK.format(split=split)], capture_output=True, text=True,
                           env={**__import__("os").environ, "CUDA_LAUNCH_BLOCKING": "1"})
        print(r.stdout + "\n".join(r.stderr.strip().splitlines()[-4:]))
