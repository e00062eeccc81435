#!/usr/bin/env bash
# One device call (under 300 s, one H200), twenty-ninth session's last:
#   run: bash benchmarks/next-lease.sh COMMIT    carry: [".gpurun/bundle", ".gpurun/tok", ".gpurun/common.sh"]
#   Move benchmarks/results out of the tree for the call (the bundle and it pass 64 MiB), and back after.
# Served c1 JPEG + PNG, six each, the launcher's defaults (inputs through the shared-memory region),
# at the session's last code (191a26a: a slice freed at once only where Triton ended the request).
COMMIT=$1
source .gpurun/common.sh; ln -sfn .gpurun/bundle .gpu-bundle; source .gpu-bundle/activate.sh .gpu-bundle
W=$OUT/w; mkdir -p $W
QWEN3VL_STAGE_TIMING=1 BARE=1 MODEL=Qwen3-VL-30B-A3B-Instruct-FP8 CONCURRENCY=1 FORMATS=jpeg,png OUT_TOKENS=64 REPEATS=6 \
  timeout 250 bash benchmarks/gpu_serving.sh $W/c1 > $W/c1.txt 2>&1
grep -h "stage " $W/c1/tritonserver.log | sed 's/^.*\] "//' > $W/c1/stage-lines.txt
/tmp/pyenv/bin/python -c "
import json, glob
for f in glob.glob('$W/c1/serving-*.json'):
    for r in json.load(open(f))['rows']:
        print(r['image_format'], 'ttft p50', round(r['ttft_p50_ms'], 1), 'min', round(r['ttft_min_ms'], 1), 'first', round(r['adapter_first_ms'], 1))"
grep "large inputs" $W/c1/frontend.log | head -2
cd $OUT && tar czf results.tgz w
