#!/usr/bin/env bash
# Prepare .gpurun/ for a device lease (run here, from the project root, after `make venv`):
#   tok/qwen.tiktoken   the Qwen vocabulary (the GPU host has no dashscope wheel): QWEN_TIKTOKEN_FILE
#   bundle/             `make gpu-bundle` without decord (video only), so that it fits the 64 MiB a
#                       call may carry; on the host: ln -sfn .gpurun/bundle .gpu-bundle &&
#                       source .gpu-bundle/activate.sh .gpu-bundle
#   common.sh           the environment every run sources: NVLink multicast off, the tokenizer, the
#                       test cache, QWEN3VL_COMMIT=$COMMIT
# .gpurun/ is listed in .git/info/exclude, so carry it (or its parts) with each call.
set -euo pipefail
mkdir -p .gpurun/tok .gpurun/var
grep -qx ".gpurun/" .git/info/exclude 2>/dev/null || echo ".gpurun/" >> .git/info/exclude
tok=$(.venv/bin/python -c "import importlib.util as u, pathlib as p; \
print(p.Path(list(u.find_spec('dashscope').submodule_search_locations)[0]) / 'resources' / 'qwen.tiktoken')")
cp "$tok" .gpurun/tok/
# built again where it lacks Triton or a wheel the Makefile's GPU_WHEELS names now (a new dependency)
stale=0
for w in $(make -s -f Makefile -f - print-GPU_WHEELS <<< 'print-%: ; @echo $($*)'); do
  ls .gpu-bundle/wheels/"${w%%==*}"-"${w##*==}"-*.whl >/dev/null 2>&1 || { echo "bundle lacks $w"; stale=1; }
done
[ -f .gpu-bundle/tritonserver.tar.xz ] && [ $stale = 0 ] || make gpu-bundle
rm -rf .gpurun/bundle && cp -r .gpu-bundle .gpurun/bundle && rm -f .gpurun/bundle/wheels/decord-*
cat > .gpurun/common.sh <<'ENV'
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export QWEN_TIKTOKEN_FILE=$PWD/.gpurun/tok/qwen.tiktoken QWEN3VL_TEST_CACHE=/tmp/tests PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
export QWEN3VL_COMMIT=${COMMIT:-unknown}
ENV
du -sh .gpurun
