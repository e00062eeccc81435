#!/usr/bin/env bash
# One device call (under 480 s, one H200), twenty-ninth session:
#   run: bash benchmarks/next-lease.sh COMMIT    carry: [".gpurun/bundle", ".gpurun/tok", ".gpurun/common.sh"]
#   Move benchmarks/results out of the tree for the call (the bundle and it pass 64 MiB), and back after.
# 1. GPU tests the session's removals touch: nvJPEG's decode_frame (the PNG branch is gone), the
#    grouped GEMM's SWAP_AB equality (its TMA arguments are gone), the 30B-shape fp8 paths.
# 2. Served c1 JPEG + PNG, six each, the launcher's defaults: the adapter's inputs through the
#    shared-memory region (a315432), then --triton-shm-mb 0 (inside gRPC messages, as before).
# 3. c64 JPEG, three waves, the same two settings.
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
              'p99', round(r.get('ttft_p99_ms', 0), 1), 'itl', round(r['itl_p50_ms'], 2), 'tok/s', round(r.get('total_tok_s', 0)),
              'first', round(r.get('adapter_first_ms', 0), 1), 'read+parse', round(r.get('adapter_read_ms', 0) + r.get('adapter_parse_ms', 0), 1))"
}
timeout 120 /tmp/pyenv/bin/python -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_fp8.py \
  -k "jpeg or swap_ab or 30b" > $W/gpu-tests.txt 2>&1; tail -2 $W/gpu-tests.txt
for shm in 256 0; do
  QWEN3VL_STAGE_TIMING=1 BARE=1 MODEL=Qwen3-VL-30B-A3B-Instruct-FP8 CONCURRENCY=1 FORMATS=jpeg,png OUT_TOKENS=64 REPEATS=6 \
    timeout $(left $([ $shm = 256 ] && echo 190 || echo 280)) bash benchmarks/gpu_serving.sh $W/c1-shm$shm --triton-shm-mb $shm > $W/c1-shm$shm.txt 2>&1
  summary c1-shm$shm
done
for shm in 256 0; do
  BARE=1 MODEL=Qwen3-VL-30B-A3B-Instruct-FP8 CONCURRENCY=64 FORMATS=jpeg OUT_TOKENS=64 REPEATS=3 \
    timeout $(left $([ $shm = 256 ] && echo 380 || echo 470)) bash benchmarks/gpu_serving.sh $W/c64-shm$shm --triton-shm-mb $shm > $W/c64-shm$shm.txt 2>&1
  summary c64-shm$shm
done
cd $OUT && tar czf results.tgz w
