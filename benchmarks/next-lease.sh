#!/usr/bin/env bash
# One device call (under 450 s, one H200), twenty-ninth session:
#   run: bash benchmarks/next-lease.sh COMMIT
#   carry: [".gpurun/bundle", ".gpurun/tok", ".gpurun/common.sh", ".gpurun/fused_moe_1cf3c26.py"]
#   Move benchmarks/results out of the tree for the call (the bundle and it pass 64 MiB), and back after.
# The rows at e6379fb were 0.8-1.6% slower than 18fb2fc's (another lease). The one kernel change
# since is the grouped GEMM's TMA arguments removed: fp8 c16 and c64 with kernels/fused_moe.py as
# it is (A) and as it was at 1cf3c26 (B, .gpurun/fused_moe_1cf3c26.py), A B A, in one lease.
COMMIT=$1
source .gpurun/common.sh; ln -sfn .gpurun/bundle .gpu-bundle; source .gpu-bundle/activate.sh .gpu-bundle
W=$OUT/w; mkdir -p $W; START=$(date +%s)
left() { echo $(( $1 - $(date +%s) + START )); }
cp kernels/fused_moe.py .gpurun/fused_moe_now.py
i=0
for v in now 1cf3c26 now; do
  i=$((i + 1))
  cp .gpurun/fused_moe_$v.py kernels/fused_moe.py
  timeout $(left $((140 * i))) python -m benchmarks.engine --config Qwen3-VL-30B-A3B-Instruct-FP8 --concurrency 16,64 \
    --out-tokens 64 --routing uniform --out $W/$i-$v > $W/rows-$i-$v.txt 2>&1
  echo "$i $v"; grep -A3 "^tp  ep" $W/rows-$i-$v.txt | cut -c1-240
done
cp .gpurun/fused_moe_now.py kernels/fused_moe.py
cd $OUT && tar czf results.tgz w
