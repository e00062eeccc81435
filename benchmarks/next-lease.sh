#!/usr/bin/env bash
# One device call (under 450 s, one H200), left by the twenty-eighth session (its last two calls found no machine):
#   run: bash benchmarks/next-lease.sh COMMIT    carry: [".gpurun/bundle", ".gpurun/tok", ".gpurun/common.sh"]
#   Move benchmarks/results out of the tree for the call (the bundle and it pass 64 MiB), and back after.
# 1. Served c1 JPEG + PNG, six each, the launcher's defaults (the features on the GPU and the ViT's
#    graphs since e8291c8), with stage lines: the PNG's decode took 14-16 ms in the preprocess stub
#    against 10.7 in benchmarks.preprocess on the same host (page faults, counted on a 2-core VM,
#    were not it: NOTES, twenty-eighth session).
#    Before it, benchmarks.preprocess under the host's Python (numpy 2, as the twenty-eighth session
#    ran it: 10.7 ms) and under /tmp/pyenv (numpy 1.26, the stub's environment): is it the environment?
# 2. c64 JPEG, three waves, the same server settings: Triton's CUDA pool (1 GB) and 64 requests'
#    ~30 MB of features each, now that they stay on the GPU by default (no allocation failure was
#    logged at fc18095 with the guide's flags).
COMMIT=$1
source .gpurun/common.sh; ln -sfn .gpurun/bundle .gpu-bundle; source .gpu-bundle/activate.sh .gpu-bundle
W=$OUT/w; mkdir -p $W; START=$(date +%s)
left() { echo $(( $1 - $(date +%s) + START )); }
summary() {
  /tmp/pyenv/bin/python -c "
import json, glob
for f in glob.glob('$W/$1/serving-*.json'):
    for r in json.load(open(f))['rows']:
        print('$1', r['image_format'], r['concurrency'], 'ttft p50', round(r['ttft_p50_ms'], 1), 'min', round(r.get('ttft_min_ms', 0), 1),
              'p99', round(r.get('ttft_p99_ms', 0), 1), 'itl', round(r['itl_p50_ms'], 2), 'tok/s', round(r.get('total_tok_s', 0)))"
  grep -c "Failed to allocate\|failed to copy" $W/$1/tritonserver.log | sed "s/^/$1 pool warnings: /"
}
for py in python /tmp/pyenv/bin/python; do
  timeout 60 $py -m benchmarks.preprocess --config Qwen3-VL-30B-A3B-Instruct-FP8 --repeats 10 --out $W > $W/preprocess.txt 2>&1
  echo "preprocess under $py"; grep -A4 "png_decode" $W/preprocess.txt | head -4
done
QWEN3VL_STAGE_TIMING=1 BARE=1 MODEL=Qwen3-VL-30B-A3B-Instruct-FP8 CONCURRENCY=1 FORMATS=jpeg,png OUT_TOKENS=64 REPEATS=6 \
  timeout $(left 250) bash benchmarks/gpu_serving.sh $W/c1 > $W/c1.txt 2>&1
grep -h "stage " $W/c1/tritonserver.log | sed 's/^.*\] "//' > $W/c1/stage-lines.txt
summary c1; grep "stage preprocess" $W/c1/stage-lines.txt | grep -o "decode=[0-9.]*" | tr '\n' ' '; echo
BARE=1 MODEL=Qwen3-VL-30B-A3B-Instruct-FP8 CONCURRENCY=64 FORMATS=jpeg OUT_TOKENS=64 REPEATS=3 \
  timeout $(left 440) bash benchmarks/gpu_serving.sh $W/c64 > $W/c64.txt 2>&1
summary c64
cd $OUT && tar czf results.tgz w
