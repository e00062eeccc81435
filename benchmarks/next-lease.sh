#!/usr/bin/env bash
# One device call (under 600 s, one H200) for what the twenty-sixth session left waiting:
#   here, once: bash benchmarks/gpu_prep.sh    (.gpurun/: tokenizer, bundle, common.sh)
#   run: bash benchmarks/next-lease.sh COMMIT [pipe|png]    carry: [".gpurun"]
# pipe: the pair kernels' PIPE bits test on the GPU, then benchmarks/variants/pair-pipe-30b-fp8.json
#   at c1 (engine_ab: ~35 s a run, six runs).
# png: 1. the PNG path's GPU test (kernels.png's wavefront against the host's pixels) and nvJPEG's;
#   2. benchmarks.preprocess's PNG rows (pyspng, libdeflate, inflate + GPU unfilter); 3. served
#   PNG TTFT at c1 with QWEN3VL_PNG_ON_VIT=1, then without (30B fp8, dummy; two server starts:
#   the second may be cut by the call's limit, and then needs a call of its own).
# The bundle needs the deflate wheel (gpu_prep.sh builds it again where a GPU_WHEELS wheel is missing).
COMMIT=$1; PART=${2:-pipe}
source .gpurun/common.sh; ln -sfn .gpurun/bundle .gpu-bundle; source .gpu-bundle/activate.sh .gpu-bundle
W=$OUT/w; mkdir -p $W; START=$(date +%s)
left() { echo $(( $1 - $(date +%s) + START )); }
if [ "$PART" = pipe ]; then
  timeout 120 python -m pytest -q tests/test_fp8.py -k "pipe_gives or pair" > $W/gpu-tests-pipe-$COMMIT.txt 2>&1
  tail -3 $W/gpu-tests-pipe-$COMMIT.txt
  timeout $(left 570) python -m benchmarks.engine_ab --variants benchmarks/variants/pair-pipe-30b-fp8.json \
    --out $W/ab-pipe -- --config Qwen3-VL-30B-A3B-Instruct-FP8 --out-tokens 64 --concurrency 1 > $W/ab-pipe.txt 2>&1
  tail -9 $W/ab-pipe.txt; cp $W/ab-pipe/engine-ab-partial.json $W/ 2>/dev/null
  cd $OUT && tar czf results.tgz w; exit 0
fi
timeout 120 python -m pytest -q tests/test_gpu.py -k "png or nvjpeg_decodes" > $W/gpu-tests-png-$COMMIT.txt 2>&1
tail -3 $W/gpu-tests-png-$COMMIT.txt
timeout 90 python -m benchmarks.preprocess --config Qwen3-VL-30B-A3B-Instruct-FP8 --repeats 10 --out $W \
  > $W/preprocess-$COMMIT.txt 2>&1; tail -12 $W/preprocess-$COMMIT.txt
for png in 1 0; do
  QWEN3VL_PNG_ON_VIT=$png MODEL=Qwen3-VL-30B-A3B-Instruct-FP8 CONCURRENCY=1 FORMATS=png OUT_TOKENS=64 REPEATS=3 \
    timeout $(left $((580 - 250 * png))) bash benchmarks/gpu_serving.sh $W/served-png-on-vit-$png > $W/served-$png.txt 2>&1
  tail -6 $W/served-$png.txt
done
cd $OUT && tar czf results.tgz w
