#!/usr/bin/env bash
# One device call (under 600 s, one H200), the twenty-eighth session's last:
#   here, once: bash benchmarks/gpu_prep.sh    (.gpurun/: tokenizer, bundle, common.sh)
#   run: bash benchmarks/next-lease.sh COMMIT    carry: [".gpurun/bundle", ".gpurun/tok", ".gpurun/common.sh"]
#   The bundle (57 MB) and the tree pass the 64 MiB a call carries with benchmarks/results in it:
#   move it out of the tree for the call, and back after.
# 1. test_server_gpu (the device path end to end, now through off_the_pool) under the bundle's
#    numpy-1.26 env (/tmp/pyenv), as its docstring says; then under the host's Python (numpy 2),
#    where Server now refuses to start the 2.51 stub and says why.
# 2. Served with the launcher's defaults (the features on the GPU, the ViT's graphs), c16 JPEG and
#    PNG, three waves each: #15 asks for the TTFT at c16 to be reported.
COMMIT=$1
source .gpurun/common.sh; ln -sfn .gpurun/bundle .gpu-bundle; source .gpu-bundle/activate.sh .gpu-bundle
W=$OUT/w; mkdir -p $W; START=$(date +%s)
left() { echo $(( $1 - $(date +%s) + START )); }
timeout 150 /tmp/pyenv/bin/python -m pytest -q tests/test_server_gpu.py tests/test_triton_tensors.py > $W/server-gpu-$COMMIT.txt 2>&1
tail -2 $W/server-gpu-$COMMIT.txt
python -c "import numpy; print('host numpy', numpy.__version__)"
timeout 60 python -m pytest -q -x tests/test_server_gpu.py > $W/server-gpu-numpy2-$COMMIT.txt 2>&1
grep -o "cannot serve: the Python environment [^ ]* has numpy [0-9.]*" $W/server-gpu-numpy2-$COMMIT.txt | head -1
tail -1 $W/server-gpu-numpy2-$COMMIT.txt
QWEN3VL_STAGE_TIMING=1 BARE=1 MODEL=Qwen3-VL-30B-A3B-Instruct-FP8 CONCURRENCY=16 FORMATS=jpeg,png OUT_TOKENS=64 REPEATS=3 \
  timeout $(left 560) bash benchmarks/gpu_serving.sh $W/default-c16 > $W/default-c16.txt 2>&1
/tmp/pyenv/bin/python -c "
import json, glob
for f in glob.glob('$W/default-c16/serving-*.json'):
    for r in json.load(open(f))['rows']:
        print('default', r['image_format'], r['concurrency'], round(r['ttft_p50_ms'], 1), round(r.get('ttft_p99_ms', 0), 1),
              round(r['itl_p50_ms'], 2), round(r.get('total_tok_s', 0)))"
grep -c "Failed to allocate" $W/default-c16/tritonserver.log
cd $OUT && tar czf results.tgz w
