#!/usr/bin/env bash
# Device calls (each under 600 s, one H200):
#   run: bash benchmarks/next-lease.sh COMMIT PART    carry: [".gpurun/bundle", ".gpurun/tok", ".gpurun/common.sh"]
#   Move benchmarks/results out of the tree for the call (the bundle and it pass 64 MiB), and back after.
# PART slot (next session first): down's slots as 2-D tiles (DOWN_SLOT_SUM, written in the
#   thirtieth session, CPU only): its GPU tests, benchmarks.pair_variants for fp8 and bf16, then
#   benchmarks/variants/pair-slot-30b-fp8.json in the c1 step (engine_ab, ~30 s a run); PART
#   slot-bf16: pair-slot-30b-bf16.json in the c1 step. A winner goes into the table (fp8) or a
#   bf16 pairs entry, then PART rows at that commit (the GPU tests the fp8 table reaches, then
#   30B fp8 and bf16 at c1/16/64/128).
COMMIT=$1; PART=${2:-slot}
source .gpurun/common.sh; ln -sfn .gpurun/bundle .gpu-bundle; source .gpu-bundle/activate.sh .gpu-bundle
W=$OUT/w; mkdir -p $W; START=$(date +%s)
left() { echo $(( $1 - $(date +%s) + START )); }
CONFIG=Qwen3-VL-30B-A3B-Instruct
if [ "$PART" = slot ]; then
  # node ids, not -k: on the GPU host a -k over these names selected ~10x the tests it selects here
  timeout 90 python -m pytest -q -p no:cacheprovider tests/test_fp8.py::test_moe_pairs_down_slot_sum \
    tests/test_fp8.py::test_moe_pairs_gate_up_through_a_tma_descriptor > $W/gpu-tests-$COMMIT.txt 2>&1; grep -E "Error|assert|FAILED|passed|failed" $W/gpu-tests-$COMMIT.txt | head -10
  timeout $(left 250) python -m benchmarks.pair_variants --dtypes fp8,bf16 --out $W > $W/pair-variants.txt 2>&1
  cut -c1-110 $W/pair-variants.txt
  timeout $(left 585) python -m benchmarks.engine_ab --variants benchmarks/variants/pair-slot-30b-fp8.json \
    --out $W/ab -- --config $CONFIG-FP8 --out-tokens 64 --concurrency 1 > $W/ab-slot-fp8.txt 2>&1
  tail -8 $W/ab-slot-fp8.txt; cp $W/ab/engine-ab-partial.json $W/ 2>/dev/null; cd $OUT && tar czf results.tgz w; exit 0
fi
if [ "$PART" = slot-bf16 ]; then
  timeout 560 python -m benchmarks.engine_ab --variants benchmarks/variants/pair-slot-30b-bf16.json \
    --out $W/ab -- --config $CONFIG --out-tokens 64 --concurrency 1 > $W/ab-slot-bf16.txt 2>&1
  tail -7 $W/ab-slot-bf16.txt; cp $W/ab/engine-ab-partial.json $W/ 2>/dev/null; cd $OUT && tar czf results.tgz w; exit 0
fi
if [ "$PART" = rows ]; then
  timeout 150 python -m pytest -q -p no:cacheprovider tests/test_fp8.py::test_fp8_gpu_paths_at_30b_shapes \
    tests/test_fp8.py::test_moe_pairs_gate_up_through_a_tma_descriptor > $W/gpu-tests-$COMMIT.txt 2>&1; grep -E "Error|assert|FAILED|passed|failed" $W/gpu-tests-$COMMIT.txt | head -10
  for cfg in Qwen3-VL-30B-A3B-Instruct-FP8 Qwen3-VL-30B-A3B-Instruct; do
    timeout $(left $([ $cfg = Qwen3-VL-30B-A3B-Instruct ] && echo 560 || echo 330)) python -m benchmarks.engine \
      --config $cfg --concurrency 1,16,64,128 --out-tokens 64 --routing uniform --out $W > $W/rows-$cfg.txt 2>&1
    tail -6 $W/rows-$cfg.txt | cut -c1-150
  done
  cd $OUT && tar czf results.tgz w; exit 0
fi
echo "unknown part $PART (slot, slot-bf16, rows)"; exit 2
