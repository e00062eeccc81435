#!/usr/bin/env bash
# One device call (under 600 s, one H200) for what the twenty-seventh session left waiting:
#   here, once: bash benchmarks/gpu_prep.sh    (.gpurun/: tokenizer, bundle, common.sh)
#   run: bash benchmarks/next-lease.sh COMMIT    carry: [".gpurun/bundle", ".gpurun/tok", ".gpurun/common.sh"]
#   The bundle (57 MB: numpy 1.26's wheel, Triton's archive) and the tree pass the 64 MiB a call
#   carries with benchmarks/results in it: move it out of the tree for the call, and back after.
# 1. The PNG and nvJPEG GPU tests (the PNG path's kernel and on_white's table on the device).
# 2. benchmarks.preprocess's PNG rows on the GPU host's CPU: libdeflate + pyspng (the host path
#    since 7ba7fb9) against pyspng alone, where this machine had 8.71 against 10.24 ms.
# 3. Served TTFT at c1, JPEG then PNG, six requests each, with QWEN3VL_STAGE_TIMING=1: the
#    preprocess, vit and llm stage lines (the llm's is new: its execute took 11-12 ms in the
#    twenty-seventh session's lease, whose runs lacked the guide's flags). Three servers: the
#    guide's flags (--keep-mm-feature-on-device --enable-vit-cuda-graph, as 28b209e's 58.8 ms JPEG
#    run had them), then --enable-vit-cuda-graph alone (the ViT's ~30 MB of float32 features a
#    1280x720 image through the host and Triton's shared memory), then the guide's flags again.
#    The stage lines go to stage-lines.txt.
COMMIT=$1
source .gpurun/common.sh; ln -sfn .gpurun/bundle .gpu-bundle; source .gpu-bundle/activate.sh .gpu-bundle
W=$OUT/w; mkdir -p $W; START=$(date +%s)
left() { echo $(( $1 - $(date +%s) + START )); }
timeout 120 python -m pytest -q tests/test_gpu.py -k "png or nvjpeg_decodes" \
  > $W/gpu-tests-png-$COMMIT.txt 2>&1
tail -3 $W/gpu-tests-png-$COMMIT.txt
timeout 90 python -m benchmarks.preprocess --config Qwen3-VL-30B-A3B-Instruct-FP8 --repeats 10 --out $W \
  > $W/preprocess-$COMMIT.txt 2>&1; tail -12 $W/preprocess-$COMMIT.txt
for run in 1 2 3; do
  flags="--keep-mm-feature-on-device --enable-vit-cuda-graph"; [ $run = 2 ] && flags=--enable-vit-cuda-graph
  QWEN3VL_STAGE_TIMING=1 MODEL=Qwen3-VL-30B-A3B-Instruct-FP8 CONCURRENCY=1 FORMATS=jpeg,png OUT_TOKENS=64 REPEATS=6 \
    timeout $(left $((240 + 110 * run))) bash benchmarks/gpu_serving.sh $W/served-$run $flags > $W/served-$run.txt 2>&1
  grep -h "stage " $W/served-$run/tritonserver.log | sed 's/^.*\] "//' > $W/served-$run/stage-lines.txt
  python -c "
import json, glob
for f in glob.glob('$W/served-$run/serving-*.json'):
    for r in json.load(open(f))['rows']:
        print('$run', '$flags', r['image_format'], round(r['ttft_p50_ms'], 1), round(r['ttft_min_ms'], 1),
              round(r['preprocess_compute_infer_ms'], 1), round(r['vit_compute_infer_ms'], 1))"
  grep -h "stage llm" $W/served-$run/stage-lines.txt | tail -3
done
cd $OUT && tar czf results.tgz w
