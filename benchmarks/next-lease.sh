#!/usr/bin/env bash
# One device call (under 600 s, one H200), the twenty-eighth session's third:
#   here, once: bash benchmarks/gpu_prep.sh    (.gpurun/: tokenizer, bundle, common.sh)
#   run: bash benchmarks/next-lease.sh COMMIT    carry: [".gpurun/bundle", ".gpurun/tok", ".gpurun/common.sh",
#        ".gpurun/llm_model_6a75549.py"] (the llm model before off_the_pool: git show 6a75549:model_repository/llm/1/model.py)
#   The bundle (57 MB) and the tree pass the 64 MiB a call carries with benchmarks/results in it:
#   move it out of the tree for the call, and back after.
# 1. test_server_gpu (the device path end to end), its servers' logs kept; failed at fc18095 with a
#    500 and no log. If it fails again, once more with 6a75549's llm model (before off_the_pool).
# 2. The launcher's GPU defaults test.
# 3. Served with the launcher's defaults (BARE=1: now the features on the GPU and the ViT's graphs),
#    c1 JPEG + PNG, six requests each.
COMMIT=$1
source .gpurun/common.sh; ln -sfn .gpurun/bundle .gpu-bundle; source .gpu-bundle/activate.sh .gpu-bundle
W=$OUT/w; mkdir -p $W; START=$(date +%s)
left() { echo $(( $1 - $(date +%s) + START )); }
server_test() {
  rm -rf /tmp/pt; timeout 150 python -m pytest -q -x tests/test_server_gpu.py --basetemp=/tmp/pt > $W/server-gpu-$1.txt 2>&1
  rc=$?; tail -2 $W/server-gpu-$1.txt
  mkdir -p $W/logs-$1; (cd /tmp/pt && find . -name "*.log" | while read f; do
    mkdir -p $W/logs-$1/$(dirname $f); tail -c 60000 $f > $W/logs-$1/$f; done)
  return $rc
}
if ! server_test $COMMIT; then
  cp model_repository/llm/1/model.py /tmp/llm_model_now.py; cp .gpurun/llm_model_6a75549.py model_repository/llm/1/model.py
  server_test old-llm-6a75549; cp /tmp/llm_model_now.py model_repository/llm/1/model.py
fi
timeout 60 python -m pytest -q tests/test_launch.py -k "replays_graphs_by_default" > $W/launch-gpu-$COMMIT.txt 2>&1
tail -1 $W/launch-gpu-$COMMIT.txt
QWEN3VL_STAGE_TIMING=1 BARE=1 MODEL=Qwen3-VL-30B-A3B-Instruct-FP8 CONCURRENCY=1 FORMATS=jpeg,png OUT_TOKENS=64 REPEATS=6 \
  timeout $(left 560) bash benchmarks/gpu_serving.sh $W/default > $W/default.txt 2>&1
grep -h "stage " $W/default/tritonserver.log | sed 's/^.*\] "//' > $W/default/stage-lines.txt
python -c "
import json, glob
for f in glob.glob('$W/default/serving-*.json'):
    for r in json.load(open(f))['rows']:
        print('default', r['image_format'], r['concurrency'], round(r['ttft_p50_ms'], 1), round(r.get('ttft_min_ms', 0), 1),
              round(r.get('vit_compute_infer_ms', 0), 1), round(r['itl_p50_ms'], 2))"
grep "enable_vit_cuda_graph\|keep_mm" $W/default/launch.log | head -2
cd $OUT && tar czf results.tgz w
