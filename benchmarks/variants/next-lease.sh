#!/usr/bin/env bash
# One device call (under 600 s) for the variants in this folder, on one H200:
#   bash benchmarks/gpu_prep.sh                      # here, once: .gpurun/ (tokenizer, bundle, common.sh)
#   run: bash benchmarks/variants/next-lease.sh COMMIT [tests|tma16|tma64|rest]   carry: [".gpurun"]
# tests: the GPU tests of TMA and NORM_QUANT and the greedy parity cases; tma16 / tma64: the TMA
# A/B at c16 / c64 (an engine run took ~35 / ~60 s a variant on the H200); rest: NORM_QUANT at c16
# and c64, then the 128-token SWAP_AB at c128. Results under $OUT/w (results.tgz); each engine_ab
# leaves engine-ab-partial.json where its time runs out.
COMMIT=$1; PART=${2:-tests}
source .gpurun/common.sh; ln -sfn .gpurun/bundle .gpu-bundle; source .gpu-bundle/activate.sh .gpu-bundle
W=$OUT/w; mkdir -p $W; START=$(date +%s)
left() { echo $(( $1 - $(date +%s) + START )); }
ARGS="--config Qwen3-VL-30B-A3B-Instruct-FP8 --out-tokens 64"
V=benchmarks/variants
case $PART in
  tests)
    timeout 540 python -m pytest -q tests/test_fp8.py tests/test_kernels.py tests/test_gpu.py \
      -k "swap_ab_and_tma or norm_quant or rmsnorm_quantized or switches_keep or gpu_bf16_greedy_matches_cpu_fp32" \
      > $W/gpu-tests-$COMMIT.txt 2>&1; tail -3 $W/gpu-tests-$COMMIT.txt ;;
  tma16|tma64)
    timeout $(left 560) python -m benchmarks.engine_ab --variants $V/tma-30b-fp8.json --out $W/ab-$PART \
      -- $ARGS --concurrency ${PART#tma} > $W/ab-$PART.txt 2>&1; tail -10 $W/ab-$PART.txt ;;
  rest)
    timeout $(left 330) python -m benchmarks.engine_ab --variants $V/norm-quant-30b-fp8.json --out $W/ab-norm-quant \
      -- $ARGS --concurrency 16,64 > $W/ab-norm-quant.txt 2>&1; tail -8 $W/ab-norm-quant.txt
    timeout $(left 570) python -m benchmarks.engine_ab --variants $V/moe128-30b-fp8.json --out $W/ab-moe128 \
      -- $ARGS --concurrency 128 > $W/ab-moe128.txt 2>&1; tail -8 $W/ab-moe128.txt ;;
esac
cp $W/ab-*/engine-ab-partial.json $W/ 2>/dev/null
cd $OUT && tar czf results.tgz w
