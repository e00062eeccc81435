"""Kernel paths that are off until measured on a GPU, one environment variable each ("1": on).
Read where they act (at each launch, or when the model runner chooses the kernels), so tests and
comparisons may set this module's values; `benchmarks.engine_ab` compares them through a
variant's "env".

- PDL_PREFETCH (QWEN3VL_PDL_PREFETCH): decode kernels read, before PDL's wait, what the kernel
  before does not write: decode attention the KV cache but each sequence's newest position,
  norm + router the router's weights, the MoE pair path's down its routing and first weights
  (its gate_up lets it launch only after the router's kernel has finished).
- FUSED_DECODE_PREP (QWEN3VL_FUSED_DECODE_PREP): decode steps run
  kernels.attention.paged_decode_attention_prep, the q/k prep inside the attention launch.
- FUSED_INPUT_NORM (QWEN3VL_FUSED_INPUT_NORM): a decode row's residual add and input RMSNorm
  inside the qkv GEMV (kernels.linear's NORM; DecoderLayer.fuse_input_norm).
- FUSED_ROUTER (QWEN3VL_FUSED_ROUTER): batches of up to kernels.fused_moe.GATE_ROUTE_MAX_T tokens
  take the post-attention norm, the router's linear layer and the routing in one launch
  (kernels.fused_moe.gate_route; at c64 the cuBLAS router GEMM alone took 6 us a layer).
"""

import os


def _on(name: str) -> bool:
    return os.environ.get(name, "0") == "1"


PDL_PREFETCH = _on("QWEN3VL_PDL_PREFETCH")
FUSED_DECODE_PREP = _on("QWEN3VL_FUSED_DECODE_PREP")
FUSED_INPUT_NORM = _on("QWEN3VL_FUSED_INPUT_NORM")
FUSED_ROUTER = _on("QWEN3VL_FUSED_ROUTER")
