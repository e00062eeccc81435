#!/usr/bin/env bash
# One device call (under 480 s, one H200), twenty-ninth session:
#   run: bash benchmarks/next-lease.sh COMMIT    carry: [".gpurun/bundle", ".gpurun/tok", ".gpurun/common.sh"]
#   Move benchmarks/results out of the tree for the call (the bundle and it pass 64 MiB), and back after.
# c64 JPEG, four waves each, the adapter's inputs through shared memory (A) and inside gRPC
# messages (B, --triton-shm-mb 0), alternated A B A: at 169e5e2 one run each gave ITL p50 14.54
# against 20.93 ms (and 21.89 at 1cf3c26, before the region existed).
COMMIT=$1
source .gpurun/common.sh; ln -sfn .gpurun/bundle .gpu-bundle; source .gpu-bundle/activate.sh .gpu-bundle
W=$OUT/w; mkdir -p $W; START=$(date +%s)
left() { echo $(( $1 - $(date +%s) + START )); }
summary() {
  /tmp/pyenv/bin/python -c "
import json, glob
for f in glob.glob('$W/$1/serving-*.json'):
    for r in json.load(open(f))['rows']:
        print('$1', r['image_format'], r['concurrency'], 'ttft p50', round(r['ttft_p50_ms'], 1), 'p99', round(r.get('ttft_p99_ms', 0), 1),
              'itl p50', round(r['itl_p50_ms'], 2), 'p99', round(r['itl_p99_ms'], 1), 'tok/s', round(r.get('total_tok_s', 0)),
              'adapter', round(sum(r.get(k, 0) for k in ('adapter_read_ms', 'adapter_parse_ms', 'adapter_media_ms', 'adapter_prompt_ms')), 1))"
}
i=0
for shm in 256 0 256; do
  i=$((i + 1))
  BARE=1 MODEL=Qwen3-VL-30B-A3B-Instruct-FP8 CONCURRENCY=64 FORMATS=jpeg OUT_TOKENS=64 REPEATS=4 \
    timeout $(left $((150 * i))) bash benchmarks/gpu_serving.sh $W/c64-$i-shm$shm --triton-shm-mb $shm > $W/c64-$i-shm$shm.txt 2>&1
  summary c64-$i-shm$shm
done
cd $OUT && tar czf results.tgz w
