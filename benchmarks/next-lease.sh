#!/usr/bin/env bash
# One device call (under 600 s, one H200) for the twenty-eighth session's changes:
#   here, once: bash benchmarks/gpu_prep.sh    (.gpurun/: tokenizer, bundle, common.sh)
#   run: bash benchmarks/next-lease.sh COMMIT    carry: [".gpurun/bundle", ".gpurun/tok", ".gpurun/common.sh",
#        ".gpurun/llm_model_6a75549.py"] (the llm model before off_the_pool: git show 6a75549:model_repository/llm/1/model.py)
#   The bundle (57 MB) and the tree pass the 64 MiB a call carries with benchmarks/results in it:
#   move it out of the tree for the call, and back after.
# 1. GPU tests: off_the_pool, the launcher's default, the device path end to end (test_server_gpu).
# 2. Served with the launcher's defaults (BARE=1: the features now stay on the GPU by default, the
#    ViT eager), c1 JPEG + PNG, six requests each.
# 3. The same with --enable-vit-cuda-graph, then c64 JPEG three times (Triton's 1 GB CUDA pool under
#    64 requests' ~30 MB of features each).
# 4. The llm model of 6a75549 (features held in the pool for a sequence's life), the guide's flags,
#    c64 JPEG three times: does the pool run out, and what does a request see then?
COMMIT=$1
source .gpurun/common.sh; ln -sfn .gpurun/bundle .gpu-bundle; source .gpu-bundle/activate.sh .gpu-bundle
W=$OUT/w; mkdir -p $W; START=$(date +%s)
left() { echo $(( $1 - $(date +%s) + START )); }
timeout 150 python -m pytest -q tests/test_triton_tensors.py tests/test_server_gpu.py \
  "tests/test_launch.py::test_features_stay_on_the_gpu_by_default_where_the_models_run_on_one" \
  > $W/gpu-tests-$COMMIT.txt 2>&1
tail -3 $W/gpu-tests-$COMMIT.txt
summary() {
  python -c "
import json, glob
for f in glob.glob('$W/$1/serving-*.json'):
    for r in json.load(open(f))['rows']:
        print('$1', r['image_format'], r['concurrency'], round(r['ttft_p50_ms'], 1), round(r['ttft_min_ms'], 1),
              round(r.get('vit_compute_infer_ms', 0), 1), round(r['itl_p50_ms'], 2))"
  grep -c "Failed to allocate\|failed to copy\|CNMEM" $W/$1/tritonserver.log | sed "s/^/$1 pool warnings: /"
  grep -h "rror" $W/$1.txt | head -3
}
QWEN3VL_STAGE_TIMING=1 BARE=1 MODEL=Qwen3-VL-30B-A3B-Instruct-FP8 CONCURRENCY=1 FORMATS=jpeg,png OUT_TOKENS=64 REPEATS=6 \
  timeout $(left 300) bash benchmarks/gpu_serving.sh $W/default > $W/default.txt 2>&1
grep -h "stage " $W/default/tritonserver.log | sed 's/^.*\] "//' > $W/default/stage-lines.txt; summary default
MODEL=Qwen3-VL-30B-A3B-Instruct-FP8 CONCURRENCY=1,64 FORMATS=jpeg OUT_TOKENS=64 REPEATS=3 \
  timeout $(left 430) bash benchmarks/gpu_serving.sh $W/graph --enable-vit-cuda-graph > $W/graph.txt 2>&1
summary graph
cp model_repository/llm/1/model.py /tmp/llm_model_now.py; cp .gpurun/llm_model_6a75549.py model_repository/llm/1/model.py
MODEL=Qwen3-VL-30B-A3B-Instruct-FP8 CONCURRENCY=64 FORMATS=jpeg OUT_TOKENS=64 REPEATS=3 \
  timeout $(left 570) bash benchmarks/gpu_serving.sh $W/pool-6a75549 > $W/pool-6a75549.txt 2>&1
cp /tmp/llm_model_now.py model_repository/llm/1/model.py
summary pool-6a75549
cd $OUT && tar czf results.tgz w
