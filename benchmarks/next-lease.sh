#!/usr/bin/env bash
# One device call (under 600 s, one H200): the llm's off_the_pool against 6a75549's llm model
# (features read in place from Triton's CUDA pool), c64 JPEG, three waves, the launcher's defaults,
# servers alternated new / old / new: at fc18095 one run each gave ITL p50 16.47 against 13.63 ms.
#   run: bash benchmarks/next-lease.sh COMMIT    carry: [".gpurun/bundle", ".gpurun/tok", ".gpurun/common.sh",
#        ".gpurun/llm_model_6a75549.py"] (git show 6a75549:model_repository/llm/1/model.py); move
#   benchmarks/results out of the tree for the call (64 MiB), and back after.
COMMIT=$1
source .gpurun/common.sh; ln -sfn .gpurun/bundle .gpu-bundle; source .gpu-bundle/activate.sh .gpu-bundle
W=$OUT/w; mkdir -p $W; START=$(date +%s)
left() { echo $(( $1 - $(date +%s) + START )); }
cp model_repository/llm/1/model.py /tmp/llm_model_now.py
limit=90
for run in new-1 old new-2; do
  limit=$((limit + 150)); [ $limit -gt 440 ] && limit=440
  if [ $run = old ]; then cp .gpurun/llm_model_6a75549.py model_repository/llm/1/model.py; else cp /tmp/llm_model_now.py model_repository/llm/1/model.py; fi
  BARE=1 MODEL=Qwen3-VL-30B-A3B-Instruct-FP8 CONCURRENCY=64 FORMATS=jpeg OUT_TOKENS=64 REPEATS=3 \
    timeout $(left $limit) \
    bash benchmarks/gpu_serving.sh $W/c64-$run > $W/c64-$run.txt 2>&1
  /tmp/pyenv/bin/python -c "
import json, glob
for f in glob.glob('$W/c64-$run/serving-*.json'):
    for r in json.load(open(f))['rows']:
        print('$run', r['concurrency'], 'ttft p50', round(r['ttft_p50_ms'], 1), 'p99', round(r.get('ttft_p99_ms', 0), 1),
              'itl p50', round(r['itl_p50_ms'], 2), 'tok/s', round(r.get('total_tok_s', 0)))"
done
cp /tmp/llm_model_now.py model_repository/llm/1/model.py
cd $OUT && tar czf results.tgz w
