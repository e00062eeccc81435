"""Kernel paths chosen by measuring them inside the engine on a GPU, one environment variable each
("1": on, "0": off). Read where they act (at each launch, or when the model runner chooses the
kernels), so tests and comparisons may set this module's values; `benchmarks.engine_ab` compares
them through a variant's "env". Measured on one H200, 30B-A3B, dummy weights, uniform routing
(benchmarks/results/NOTES.md, fourteenth session), each alone against the default, decode step
at concurrency 1 / 16 / 64:

- PDL_PREFETCH (QWEN3VL_PDL_PREFETCH), on: decode kernels read, before PDL's wait, what the kernel
  before does not write: decode attention the KV cache but each sequence's newest position (for
  batches of at most PREFETCH_MAX_SEQS sequences), norm + router the router's weights, the MoE
  pair path's down its routing and first weights (its gate_up lets it launch only after the
  router's kernel has finished). fp8 0.965 / 0.998 / 1.000, bf16 0.965 / 1.004 / 1.009 (the last
  two decode attention's alone: hence the cap).
- FUSED_DECODE_PREP (QWEN3VL_FUSED_DECODE_PREP), off: decode steps run
  qwen3vl_kernels.attention.paged_decode_attention_prep, the q/k prep inside the attention launch. fp8
  1.031 / 1.075 / 1.24: slower everywhere (likely because each split recomputes the prep).
- FUSED_INPUT_NORM (QWEN3VL_FUSED_INPUT_NORM), off: a decode row's residual add and input RMSNorm
  inside the qkv GEMV (qwen3vl_kernels.linear's NORM; DecoderLayer.fuse_input_norm). fp8 0.994 at c1,
  bf16 1.011 (its 2-row programs each re-read the row for the statistics); 1.000 at 16 and 64.
- FLAT_QUANTIZE (QWEN3VL_FLAT_QUANTIZE): activations quantized per group by
  qwen3vl_kernels.fp8._quantize_flat_kernel (a fixed tile of (token, group) pairs a program) where K is
  whole groups, instead of a program per token. Bit for bit the same values. Unset: by shape
  (qwen3vl_kernels.fp8.flat_quantize_pays: many rows of few groups, a prefill's MoE intermediates, where
  it took 7632 x 768 in 4.7 us against 10 on an H200; it lost at the 954-row inputs of K 2048
  and 4096, 3.0 against 2.2 us, and at 16-512 rows); 1 always, 0 never.
- PREFILL_CUDNN (QWEN3VL_PREFILL_CUDNN), on: the prefill CUDA graphs (engine/prefill_graphs.py)
  are captured with SDPA trying cuDNN's attention first (layers.attention.CUDNN_FIRST), as the
  ViT's exact-grid graphs are: each bucket's length is planned once, at the capture. torch 2.11
  tries FlashAttention-2 first. Causal GQA at 1024 / 2048 tokens, 32 query and 4 KV heads of 128:
  flash 52 / 163 us, cuDNN 30 / 78; 235B's 64 heads: 90 / 270 against 47 / 139. 30B fp8 TTFT
  (engine, p50 of 8): 38.9 ms against 43.4 and 39.9 for the base runs before and after it.
- VIT_FUSED_NORM (QWEN3VL_VIT_FUSED_NORM), on: the ViT's residual adds and the LayerNorms after
  them in one launch each (qwen3vl_kernels.layernorm.add_layer_norm). VIT_GELU_EPILOGUE
  (QWEN3VL_VIT_GELU_EPILOGUE), on: the ViT MLP's tanh GELU in fc1's cuBLASLt epilogue
  (torch._addmm_activation). On an H200 (benchmarks.vit --switches, 30B's ViT, one 1280x720
  image's exact-grid graph, thirty-second session): 13.08 / 13.04 ms base, 12.62 with the first,
  12.73 with the second, 12.36 / 12.42 with both (and q/k/v laid out token-major, which alone
  gave 13.05 and was removed); engine TTFT (fp8, ViT graphs, p50 of 8, alternated) 36.2 / 35.9 ms
  off, 34.0 / 34.8 on.
- SCALES_AHEAD (QWEN3VL_SCALES_AHEAD), on: the fp8 grouped and dense GEMMs (qwen3vl_kernels.fused_moe's
  _k_steps, tiles inside one scale block) load each K step's weight and activation scales one
  step ahead, instead of in the step. The fused MoE at 954 / 2048 / 4096 tokens 1.0-2.1% faster
  (gate_up's global-load stalls ~2.0 -> ~1.6 a instruction in Nsight Compute); decode steps at
  1 / 16 / 64 unchanged (thirty-third session).
- ROPE_KERNEL (QWEN3VL_ROPE_KERNEL), on: a step's mRoPE cos/sin tables in one launch
  (qwen3vl_kernels.rope.mrope_cos_sin) instead of torch's six (float, multiply, gather, cat, cos, sin:
  ~10 us of a batch-1 decode step's graph in the H200 profiles). The same values.
- ARGMAX_KERNEL (QWEN3VL_ARGMAX_KERNEL), on: greedy sampling's argmax by qwen3vl_kernels.argmax (a row split
  over 64 programs, then one a row) instead of torch's one block a row (8.3 us for a 151,936-wide
  row in the H200's batch-1 profiles). The same index.
- SAMPLE_KERNEL (QWEN3VL_SAMPLE_KERNEL), on: batches whose rows all sample (unseeded, no
  penalties) with a top_k up to qwen3vl_kernels.sample.MAX_K draw in qwen3vl_kernels.sample's launches instead of
  the torch path's ~20 (layers.sampler.sample_batch). 30B, the release's sampling (0.7 / 0.8 /
  20), decode step on an H200 (fortieth session, each part sorting its chunk): fp8 c1 1.928 ms
  against 2.064 off (greedy 1.89), c16 7.22 against 7.31; bf16 c1 2.34 against 2.47 (greedy
  2.33). At c64 / c128 that kernel was slower, 11.58 / 14.66 against 11.44 / 14.40, so it took
  batches of up to 16 rows. The parts now offer only their values at or above the row's
  threshold, and every batch size draws here (forty-second session, engine_ab against that
  tree, step ms, base / before / base): fp8 c1 1.911 / 1.921 / 1.912, c16 7.233 / 7.350 / 7.234,
  c64 11.10 / 11.12 / 11.10, c128 13.87 / 14.04 / 13.77; bf16 c1 2.336 / 2.336 / 2.339, c64
  17.11 / 17.04 / 17.12 (inter-token p50 17.16 / 17.28 / 17.13), c128 19.33 / 19.56 / 19.33.
- KERNEL_WARPS (QWEN3VL_KERNEL_WARPS, e.g. "rmsnorm=4,sum_top_k=1"): the warps of the small
  launches between the projections (KERNEL_WARPS_NAMES), each over its default where named. For
  engine_ab: decode attention's split merge at one warp instead of four took 30B fp8 c16 from
  7.73 to 7.53 ms (twenty-second session). Measured in the step (twenty-third session, 30B fp8,
  base 2.001 / 7.410 ms at c1 / c16): q/k prep at one warp 1.990 / 7.391, route and align at one
  warp 7.359 at c16; rmsnorm at 4 or 2, quantize at 1 and the top-k sum at 1 within the base's
  spread. So q/k prep's one-row launches (decode batches up to 32), route's and align's up to 128
  pairs (16 tokens; at 64 four warps were faster) run one warp by default; the rest keep theirs.
"""

import os


def _on(name: str, default: str = "0") -> bool:
    return os.environ.get(name, default) == "1"


PDL_PREFETCH = _on("QWEN3VL_PDL_PREFETCH", "1")
PREFETCH_MAX_SEQS = 16          # decode attention's PREFETCH for batches up to this many sequences
FUSED_DECODE_PREP = _on("QWEN3VL_FUSED_DECODE_PREP")
FUSED_INPUT_NORM = _on("QWEN3VL_FUSED_INPUT_NORM")
ROPE_KERNEL = _on("QWEN3VL_ROPE_KERNEL", "1")
ARGMAX_KERNEL = _on("QWEN3VL_ARGMAX_KERNEL", "1")
SAMPLE_KERNEL = _on("QWEN3VL_SAMPLE_KERNEL", "1")
PREFILL_CUDNN = _on("QWEN3VL_PREFILL_CUDNN", "1")
VIT_FUSED_NORM = _on("QWEN3VL_VIT_FUSED_NORM", "1")
VIT_GELU_EPILOGUE = _on("QWEN3VL_VIT_GELU_EPILOGUE", "1")
SCALES_AHEAD = _on("QWEN3VL_SCALES_AHEAD", "1")
FLAT_QUANTIZE = {"1": True, "0": False}.get(os.environ.get("QWEN3VL_FLAT_QUANTIZE", ""))     # None: by shape

# the launches whose warps KERNEL_WARPS may set: qwen3vl_kernels.rmsnorm.rmsnorm, qwen3vl_kernels.fp8's activation
# quantize (both kernels), qwen3vl_kernels.fused_moe's sum_top_k, route and align_by_expert, qwen3vl_kernels.rope.qkv_prep_
KERNEL_WARPS_NAMES = ("rmsnorm", "quantize", "sum_top_k", "route", "align", "qkv_prep")


def parse_kernel_warps(spec: str) -> dict[str, int]:
    """"name=warps,..." -> {name: warps}; ValueError for a name not in KERNEL_WARPS_NAMES or warps
    not a power of two from 1 to 32."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        if name.strip() not in KERNEL_WARPS_NAMES or not value.strip().isdigit() or \
                int(value) not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"QWEN3VL_KERNEL_WARPS: {part!r}: name=warps, a name of {', '.join(KERNEL_WARPS_NAMES)} "
                             "and warps a power of two up to 32")
        out[name.strip()] = int(value)
    return out


KERNEL_WARPS = parse_kernel_warps(os.environ.get("QWEN3VL_KERNEL_WARPS", ""))


def warps(name: str, default: int) -> int:
    """The launch's warps: KERNEL_WARPS' where it names the launch, else `default`."""
    return KERNEL_WARPS.get(name, default)
