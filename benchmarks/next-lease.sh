#!/usr/bin/env bash
# One device call (under 480 s, one H200), twenty-ninth session's last:
#   run: bash benchmarks/next-lease.sh COMMIT    carry: [".gpurun/bundle", ".gpurun/tok", ".gpurun/common.sh"]
#   Move benchmarks/results out of the tree for the call (the bundle and it pass 64 MiB), and back after.
# The rows at the session's last code (the grouped GEMM without its TMA arguments): 30B-A3B fp8
# and bf16, dummy weights, uniform routing, 64 out tokens, c1/16/64/128; then the SWAP_AB equality
# test with its GPU tolerance.
COMMIT=$1
source .gpurun/common.sh; ln -sfn .gpurun/bundle .gpu-bundle; source .gpu-bundle/activate.sh .gpu-bundle
W=$OUT/w; mkdir -p $W; START=$(date +%s)
left() { echo $(( $1 - $(date +%s) + START )); }
for cfg in Qwen3-VL-30B-A3B-Instruct-FP8 Qwen3-VL-30B-A3B-Instruct; do
  timeout $(left $([ $cfg = Qwen3-VL-30B-A3B-Instruct ] && echo 400 || echo 200)) \
    python -m benchmarks.engine --config $cfg --concurrency 1,16,64,128 --out-tokens 64 --routing uniform --out $W > $W/rows-$cfg.txt 2>&1
  tail -8 $W/rows-$cfg.txt
done
timeout $(left 470) python -m pytest -q -p no:cacheprovider tests/test_fp8.py -k swap_ab > $W/gpu-tests.txt 2>&1; tail -2 $W/gpu-tests.txt
cd $OUT && tar czf results.tgz w
