#!/usr/bin/env bash
# On the GPU machine: unpack the Triton bundle, serve 30B-A3B (dummy weights) through the launcher,
# and run benchmarks.serving against it. Usage: bash benchmarks/gpu_serving.sh OUT_DIR [LAUNCH FLAGS...]
# (MODEL=Qwen3-VL-235B-A22B-Instruct-FP8 IMAGES=2 CONCURRENCY=1,16,64 choose the model and workload)
# Without LAUNCH FLAGS it serves with the guide's (--keep-mm-feature-on-device --enable-vit-cuda-graph),
# as the TTFT goal's runs do; BARE=1 serves with the launcher's own defaults (the same two on a GPU
# since the twenty-eighth session; before, an eager ViT and the features through the host, which a
# lease once compared with the guide's runs by mistake).
set -uo pipefail
out=${1:?out dir}; shift
if [ $# -eq 0 ] && [ "${BARE:-0}" != 1 ]; then set -- --keep-mm-feature-on-device --enable-vit-cuda-graph; fi
label="${*:-default}"
source .gpu-bundle/activate.sh .gpu-bundle >/dev/null
py=/tmp/pyenv/bin/python
echo "$PWD" > "$($py -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/qwen3vl.pth"
export QWEN3VL_CACHE=$PWD/.gpu/cache PYTHONUNBUFFERED=1
mkdir -p "$out/trace"
# every request's Triton timestamps, one file per request (benchmarks.triton_trace reads them)
export QWEN3VL_TRITON_ARGS="--trace-config triton,file=$(cd "$out/trace" && pwd)/trace.json --trace-config level=TIMESTAMPS --trace-config rate=1"
model=${MODEL:-Qwen3-VL-30B-A3B-Instruct}
$py -m qwen3vl_backend.launch --model-path Qwen/$model --load-format dummy --port 8000 \
    --enable-metrics "$@" > "$out/launch.log" 2>&1 &
launcher=$!
for i in $(seq 1 200); do sleep 2; grep -q "Ctrl-C" "$out/launch.log" && break; kill -0 $launcher 2>/dev/null || break; done
tail -3 "$out/launch.log"
$py -c "import urllib.request as u; u.urlopen(u.Request('http://127.0.0.1:8080/v2/trace/setting', data=b'{\"log_frequency\":\"1\"}', method='POST'))"
$py -m benchmarks.serving --url http://127.0.0.1:8000 --model $model --images ${IMAGES:-1} \
    --model-dir .serve/models/$model --concurrency ${CONCURRENCY:-1,8,32} --image-format ${FORMATS:-png} --out-tokens ${OUT_TOKENS:-128} --repeats ${REPEATS:-1} \
    --label="$label" --triton-http http://127.0.0.1:8080 --out "$out"
kill -INT $launcher; wait $launcher
$py -m benchmarks.triton_trace "$out"/trace/trace.json.* > "$out/trace-summary.txt" 2>/dev/null
tail -4 "$out/trace-summary.txt"; rm -rf "$out/trace"
cp .serve/logs/*.log "$out/" 2>/dev/null; tail -20 "$out/tritonserver.log" | grep -E "^E|rror" | head -5
