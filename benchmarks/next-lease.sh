#!/usr/bin/env bash
# Device calls (each under 600 s, one H200):
#   run: bash benchmarks/next-lease.sh COMMIT PART    carry: [".gpurun/bundle", ".gpurun/tok", ".gpurun/common.sh"]
#   Move benchmarks/results out of the tree for the call (the bundle and it pass 64 MiB), and back after.
# Parts (thirty-first session's, all run; packing measured in NOTES):
#   packed: the packed prefill's GPU tests, then 16 image requests at once (--burst 16), one
#     prompt a step against four (4096-token graphs; then 2048, the launcher's chunk, so two),
#     30B fp8 then bf16;
#   pack-cap: each prefill graph's replay time by tokens, then 16 text prompts under token caps;
#   pack-images: 16 image requests at chunk 2048, no packing against pairs, alternated;
#   rows: the GPU tests the fp8 table reaches, then 30B fp8 and bf16 at c1/16/64/128;
#   profile (thirty-second session): the align sweep, then 30B fp8 c1/c64, TTFT and profiles;
#   vit: the ViT switches' GPU tests and replay times, the align heuristic, engine TTFT off/on
#     (run at 96c74e3 with the token-major switch since removed);
#   final: the GPU parity tests, served c1 JPEG/PNG (fp8, launcher defaults), a 16-image burst.
#   moe (thirty-third session; its pieces ran as separate calls): the MoE kernel GPU tests, the
#     prefill launch variants, ncu's stalls at 954 tokens, engine TTFT per-tile / scales behind.
#   gluon (thirty-sixth session; run in the thirty-seventh at 1df4b50, ROWS 2-5x slower and removed).
#   gluon-moe (thirty-seventh; run at aa9db5e): kernels.gluon_moe 6-12% slower than the table at
#     16 and 64 tokens, so removed with its part.
#   gluon-down (thirty-eighth; run at 5196028 and 54b3e0d): kernels.gluon_pairs' down 7-14% slower
#     in the c1 step, so removed with its part.
#   route (thirty-ninth; run at fb20bcb): ROUTE_IN_PAIRS, the pair kernels taking the top-k from the
#     router's logits, 0.8-0.9% slower at fp8 c1, so removed with its part.
#   step-edges (thirty-ninth): the GPU tests of the decode step's edges (graph inputs from host lists,
#     the mRoPE table kernel, the argmax kernel), then 30B fp8 c1 in engine_ab against the commit
#     before them (carry .ab: `git archive c684b19 kernels qwen3vl_backend benchmarks`) and with each
#     kernel's switch off; step-edges-16: the same at c16 and bf16 c1, without the tests.
#   lm-head (thirty-ninth): the vocabulary projection through qwen3vl_kernels.linear.table_linear's skinny
#     launches (a table entry each) against cuBLAS, 30B fp8 c1 in engine_ab.
#   sampling (written in the thirty-ninth, not run): 30B fp8 and bf16 at c1/c16, greedy against
#     Qwen3-VL's generation config (temperature 0.7, top_p 0.8, top_k 20): what the sampler costs.
#   route-align (written in the thirty-ninth, run in the fortieth at f73428f): ROUTE_ALIGN, the
#     sorted path's routing and alignment in one launch, 1.33x slower at fp8 c16 and 1.22x at bf16
#     c16, so removed with its part.
#   sampler (fortieth): the sampler's GPU tests (no host sync on any path), then 30B fp8 c1/c16 and
#     bf16 c1 under the generation config's sampling in engine_ab against f73428f (carry .ab:
#     `git archive f73428f kernels qwen3vl_backend benchmarks ':!benchmarks/results'`), then greedy.
#   sample-kernel (fortieth): the sampler's GPU tests, then 30B fp8 c1/c16 sampled in engine_ab
#     against 1008b2f (the top-k candidates in torch; carry .ab) and with QWEN3VL_SAMPLE_KERNEL=0,
#     then bf16 c1 with the kernel off.
#   sample-rows (fortieth): the GPU tests of warm_up (now drawing sampled tokens too), graph decode,
#     the switches and the sampler, then 30B fp8 c64/c128 sampled with QWEN3VL_SAMPLE_KERNEL=0 against on.
#   router (forty-first; run at 632a37b): the batch router (the router's linear layer split over K,
#     the routing in a tile's last program) 0.9% / 2.1% slower at fp8 c16 / c64, so removed with
#     its part.
#   sampler-large (forty-first): the sampler's GPU tests, then 30B fp8 c64/c128 under the generation
#     config's sampling in engine_ab against af1e55a (the float32 copies; carry .ab:
#     `git archive af1e55a kernels qwen3vl_backend benchmarks ':!benchmarks/results'`); run at 0fcccd5:
#     c64 11.28 -> 11.10 ms, c128 14.37 -> 13.95-14.02. sampler-large-bf16: the same on 30B bf16
#     (not run).
#   ready (forty-first; run at cd821f7): READY_FLAG, batch-1 gate_up polling a flag norm_route
#     releases instead of PDL's wait, 1.1% / 1.5% slower at 30B fp8 / bf16 c1, so removed with its part.
#   sample-select (forty-second): the sampler's GPU tests (TESTS=0 skips them), then 30B (CFG: FP8 or
#     BF16) sampled at CONC (default 64,128) in engine_ab against 429c192 (each part sorting its chunk,
#     the torch path past 16 rows; carry .ab: `git archive 429c192 kernels qwen3vl_backend benchmarks
#     ':!benchmarks/results'`).
#   sampled-profile (forty-second): 30B fp8 c1 / c128 under the generation config's sampling, then
#     greedy: decode profiles (kernel timelines) and each graph's replay against the engine's step.
#   fp8-kv (forty-third): the fp8 KV cache's GPU tests (TESTS=0 skips them), then 30B (CFG: FP8 or
#     BF16) greedy at CONC (default 1,16) in engine_ab, --kv-cache-dtype fp8_e4m3 against auto.
#   fp8-kv-pairs (forty-third; run in the forty-fourth at 6b12935): V_PAIRS 0.5% / 2.1% slower at
#     fp8-cache c64 / c128, so removed with its part.
#   attention (forty-fourth): benchmarks.attention_variants over both caches at 16/64/128 sequences
#     (pages in order, then shuffled), then Nsight Compute on the table's launch at 128.
#   attention-vt (forty-fourth; run at 1040a17): V's pages transposed (V_T) 1.1-1.4x slower, so
#     removed with its part.
#   attention-swap (forty-fourth; run at 42cd878): decode attention with the tokens as the dots' M
#     (SWAP) 1.06-1.5x slower, so removed with its part.
#   fp8-kv-entry (forty-fourth): a patch of the fp8 cache's decode attention entry at CONC
#     sequences (ENTRY, its JSON; KEY, the entry's key where it is not CONC), 30B fp8 in engine_ab.
#     Run (as two parts then, the same commands) with CONC=128 ENTRY='{"num_stages": 3}' at
#     b9f5333 and CONC=16 ENTRY='{"PAGES_TOKENS": 32}' at b702da2.
#   attention-c1 (forty-fourth; run at f07dc35): batch-1 attention_variants over both caches, then
#     fp8-kv-entry at c1 (KEY 1,4,8: 32-token tiles, +1.9% in the step, not kept).
#   c1-tiles (forty-fifth): batch-1 decode attention with 32-token tiles at 32 splits (attention_variants'
#     t32-p128, the best alone for both caches in the forty-fourth) in the step: the table's "1,4,8"
#     patched (the fp8 cache has no entry of its own there, so both caches take it); 30B (CFG: FP8 or
#     BF16) at c1 in engine_ab over the caches in KV (default fp8_e4m3,auto). Run at 3c4f222: -1.1% /
#     -0.9% over the fp8 cache (fp8 / bf16 weights), kept as its own "1,4,8" entry (so over the fp8
#     cache this part now patches nothing new); within the spread over the bf16 cache.
#   gpu-suite (forty-fifth): the tests of test_gpu, test_fp8, test_kernels and test_sampling on the
#     GPU (after the kernels' package became qwen3vl_kernels; the sampler's logit_bias, forty-sixth).
#     Not `-m gpu`, as written in the forty-fifth: most GPU tests skip without CUDA and carry no
#     mark, so it selected 35 of these files' 477; test_engine's tests run on the CPU (make_engine),
#     so not here. The quick files first: a timeout leaves the slow ones' lines unwritten.
#   rows-kv (forty-fifth): 30B fp8 rows at c1/16/64/128 over the fp8 cache, then the bf16 cache.
#   attention-regs (forty-fifth): decode attention with its registers capped ("maxnreg": the fp8
#     cache's 128-token tiles take 204 a thread on sm_90, 2 blocks an SM; 168 makes 3, 128 makes 4,
#     spilling 24 / 136 bytes): attention_variants at 64 and 128 sequences over both caches, then
#     30B fp8 over the fp8 cache at c64,c128 in engine_ab with the fp8 entries capped at 168 / 128.
COMMIT=$1; PART=${2:-packed}
source .gpurun/common.sh; ln -sfn .gpurun/bundle .gpu-bundle; source .gpu-bundle/activate.sh .gpu-bundle
W=$OUT/w; mkdir -p $W; START=$(date +%s)
left() { echo $(( $1 - $(date +%s) + START )); }
# gpu_tests NAME SECONDS PYTEST-ARGS...: the GPU tests into $W/gpu-tests-NAME-$COMMIT.txt, and their verdict lines
gpu_tests() {
  local name=$1 secs=$2; shift 2
  timeout $secs python -m pytest -q -p no:cacheprovider "$@" > $W/gpu-tests-$name-$COMMIT.txt 2>&1
  grep -E "Error|assert|FAILED|passed|failed" $W/gpu-tests-$name-$COMMIT.txt | head -10
}
CONFIG=Qwen3-VL-30B-A3B-Instruct
if [ "$PART" = packed ]; then
  timeout 170 python -m pytest -q -p no:cacheprovider "tests/test_kernels.py::test_varlen_causal_attention_gpu_bf16_text_shape" \
    "tests/test_kernels.py::test_varlen_attention_gpu_bf16_vit_shape" "tests/test_gpu.py::test_prefill_cuda_graph_matches_eager_prefill" \
    "tests/test_gpu.py::test_cuda_graph_decode_matches_eager" > $W/gpu-tests-$COMMIT.txt 2>&1
  grep -E "Error|assert|FAILED|passed|failed" $W/gpu-tests-$COMMIT.txt | head -10
  for run in FP8:1:8192 FP8:4:8192 FP8:4:2048 :1:8192 :4:8192; do
    IFS=: read dt seqs chunk <<< "$run"; cfg=$CONFIG${dt:+-$dt}
    [ $(left 560) -lt 60 ] && break
    timeout $(left 575) python -m benchmarks.engine --config $cfg --burst 16 --prefill-graph-max-seqs $seqs \
      --chunked-prefill-size $chunk --out $W > $W/burst-$cfg-$seqs-$chunk.txt 2>&1
    echo "$cfg seqs $seqs chunk $chunk"; tail -3 $W/burst-$cfg-$seqs-$chunk.txt | cut -c1-150
  done
  cd $OUT && tar czf results.tgz w; exit 0
fi
if [ "$PART" = pack-cap ]; then
  # the prefill step's cost by tokens (each graph replayed), then bursts of 16 text prompts under token caps
  for cfg in $CONFIG-FP8 $CONFIG; do
    timeout $(left 300) python -m benchmarks.engine --config $cfg --prefill-graph-times --out $W > $W/graph-times-$cfg.txt 2>&1
    grep prefill_graph $W/graph-times-$cfg.txt | awk '{printf "%s %s %.2f | ", $2, $3, $4} END {print ""}'
    [ $cfg = $CONFIG ] && break
    for run in 256:0 256:1024 256:4096 512:0 512:1024 512:2048; do
      IFS=: read n cap <<< "$run"; [ $(left 480) -lt 40 ] && break
      timeout $(left 500) python -m benchmarks.engine --config $cfg --burst 16 --burst-text-tokens $n \
        --prefill-pack-max-tokens $cap --out $W > $W/burst-text-$n-$cap.txt 2>&1
      echo "text $n cap $cap: $(tail -2 $W/burst-text-$n-$cap.txt | head -1 | cut -c1-150)"
    done
  done
  cd $OUT && tar czf results.tgz w; exit 0
fi
if [ "$PART" = pack-images ]; then
  # 16 image requests at once under the launcher's chunk (2048): no packing against pairs, alternated
  for run in 0 2048 0 2048; do
    [ $(left 520) -lt 40 ] && break
    timeout $(left 540) python -m benchmarks.engine --config $CONFIG-FP8 --burst 16 --chunked-prefill-size 2048 \
      --prefill-pack-max-tokens $run --out $W > $W/burst-image-$run-$(date +%s).txt 2>&1
    echo "image cap $run: $(tail -2 $(ls -t $W/burst-image-$run-*.txt | head -1) | head -1 | cut -c1-150)"
  done
  cd $OUT && tar czf results.tgz w; exit 0
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
if [ "$PART" = profile ]; then
  # the align sweep and quantization at prefill sizes, then 30B fp8: c1/c64 rows, TTFT, the
  # first-token profile (ViT graphs on) and a c64 decode profile
  timeout 150 python -m benchmarks.kernels --only align,quantize --out $W > $W/kernels-align-$COMMIT.txt 2>&1
  grep -v "^{" $W/kernels-align-$COMMIT.txt | tail -40 | cut -c1-150
  timeout $(left 560) python -m benchmarks.engine --config $CONFIG-FP8 --concurrency 1,64 --out-tokens 32 \
    --ttft-repeats 4 --enable-vit-cuda-graph --profile-prefill --profile --profile-at 64 --out $W > $W/profile-$COMMIT.txt 2>&1
  grep -E "ttft|decode_step|one request|decode steps" $W/profile-$COMMIT.txt | cut -c1-200 | head -20
  cd $OUT && tar czf results.tgz w; exit 0
fi
if [ "$PART" = vit ]; then
  # the ViT switches' GPU tests, their replay times (alternated), the align heuristic, then the
  # engine's TTFT (fp8, ViT graphs) with the three switches off and on
  timeout 200 python -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_kernels.py \
    -k "add_layer_norm or vision_rotary or align_kernel or vit_switches or vit_cuda_graphs_equal" > $W/gpu-tests-$COMMIT.txt 2>&1
  grep -E "Error|assert|FAILED|passed|failed" $W/gpu-tests-$COMMIT.txt | head -10
  timeout 150 python -m benchmarks.vit --sizes 1280x720 --repeats 15 \
    --switches base,VIT_FUSED_NORM,VIT_GELU_EPILOGUE,all,base,all --out $W > $W/vit-switches-$COMMIT.txt 2>&1
  grep -v "^{" $W/vit-switches-$COMMIT.txt | tail -10 | cut -c1-150
  timeout 90 python -m benchmarks.kernels --only align --out $W > $W/kernels-align-$COMMIT.txt 2>&1
  grep -E "default" $W/kernels-align-$COMMIT.txt | head -24
  for v in 0 1 0 1; do
    [ $(left 540) -lt 60 ] && break
    QWEN3VL_VIT_FUSED_NORM=$v QWEN3VL_VIT_GELU_EPILOGUE=$v timeout $(left 560) \
      python -m benchmarks.engine --config $CONFIG-FP8 --concurrency 1 --out-tokens 8 --ttft-repeats 8 \
      --enable-vit-cuda-graph --out $W > $W/ttft-vit-$v-$(date +%s).txt 2>&1
    echo "vit switches $v: $(grep -A1 'kind  images' $(ls -t $W/ttft-vit-$v-*.txt | head -1) | tail -1)"
  done
  cd $OUT && tar czf results.tgz w; exit 0
fi
if [ "$PART" = final ]; then
  # the GPU parity tests with the ViT defaults on, served c1 JPEG and PNG (launcher defaults, fp8),
  # then 16 image requests at once in the engine
  timeout 200 python -m pytest -q -p no:cacheprovider tests/test_gpu.py > $W/gpu-tests-$COMMIT.txt 2>&1
  grep -E "Error|assert|FAILED|passed|failed" $W/gpu-tests-$COMMIT.txt | head -10
  QWEN3VL_STAGE_TIMING=1 BARE=1 MODEL=Qwen3-VL-30B-A3B-Instruct-FP8 CONCURRENCY=1 FORMATS=jpeg,png OUT_TOKENS=64 REPEATS=6 \
    timeout $(left 420) bash benchmarks/gpu_serving.sh $W/c1 > $W/c1.txt 2>&1
  for f in $W/c1/serving-*.json; do
    python -c "
import json
for r in json.load(open('$f'))['rows']:
    print(r['image_format'], r['concurrency'], 'ttft p50', round(r['ttft_p50_ms'], 1), 'min', round(r.get('ttft_min_ms', 0), 1))"
  done
  [ $(left 560) -gt 70 ] && timeout $(left 575) python -m benchmarks.engine --config $CONFIG-FP8 --burst 16 \
    --chunked-prefill-size 2048 --out $W > $W/burst-images-$COMMIT.txt 2>&1 && tail -3 $W/burst-images-$COMMIT.txt | cut -c1-160
  cd $OUT && tar czf results.tgz w; exit 0
fi
if [ "$PART" = moe ]; then
  # the MoE GPU tests, the prefill-size launch variants (benchmarks.moe_variants), Nsight Compute's
  # stall reasons for the table's grouped GEMMs at 954 tokens, then engine TTFT with the persistent
  # launch off / on (its table key patched) and the scales behind / ahead
  timeout 120 python -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_fp8.py \
    -k "fused_moe_matches_reference or moe_sorted or w8a8 or dense" > $W/gpu-tests-moe-$COMMIT.txt 2>&1
  tail -1 $W/gpu-tests-moe-$COMMIT.txt
  timeout $(left 250) python -m benchmarks.moe_variants --ms 954,2048,4096 --dtypes fp8 \
    --variants table,p0,table-behind,table,p0 --out $W > $W/moe-variants-$COMMIT.txt 2>&1
  grep -v "^\s*$" $W/moe-variants-$COMMIT.txt | tail -16
  timeout $(left 330) /usr/local/cuda/bin/ncu --clock-control none -k regex:_grouped_gemm --launch-count 4 \
    --section SpeedOfLight --section Occupancy --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio \
    python -m benchmarks.moe_variants --ncu --ms 954 --variants table > $W/ncu-moe-954-$COMMIT.txt 2>&1
  grep -E "^  _grouped|Duration|DRAM Throughput|long_scoreboard|barrier_per|wait_per" $W/ncu-moe-954-$COMMIT.txt | head -24
  T="E=128,N=768,K=2048,device=NVIDIA_H200,dtype=fp8_w8a8,block=128x128.json"
  echo "{\"per-tile\": {\"$T\": {\"1024\": {\"PERSISTENT\": 0}}}, \"behind\": {\"env\": {\"QWEN3VL_SCALES_AHEAD\": \"0\"}}}" > $W/v.json
  timeout $(left 575) python -m benchmarks.engine_ab --variants $W/v.json --out $W -- --config $CONFIG-FP8 \
    --concurrency 1,64 --out-tokens 16 --ttft-repeats 8 --enable-vit-cuda-graph > $W/ab-moe-$COMMIT.txt 2>&1
  tail -12 $W/ab-moe-$COMMIT.txt
  cd $OUT && tar czf results.tgz w; exit 0
fi
if [ "$PART" = step-edges ] || [ "$PART" = step-edges-16 ]; then
  echo '{"before": {"tree": ".ab/c684b19"}, "rope-off": {"env": {"QWEN3VL_ROPE_KERNEL": "0"}},
         "argmax-off": {"env": {"QWEN3VL_ARGMAX_KERNEL": "0"}}}' > $W/v.json
  if [ "$PART" = step-edges ]; then
    timeout 170 python -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_kernels.py tests/test_sampling.py \
      -k "cuda_graph_decode or switches_keep or greedy_matches or mrope_cos_sin or argmax or greedy_rows" \
      > $W/gpu-tests-edges-$COMMIT.txt 2>&1
    grep -E "Error|assert|FAILED|passed|failed" $W/gpu-tests-edges-$COMMIT.txt | head -10
    timeout $(left 585) python -m benchmarks.engine_ab --variants $W/v.json --out $W -- --config $CONFIG-FP8 \
      --concurrency 1 --out-tokens 64 --routing uniform > $W/ab-edges-fp8-c1-$COMMIT.txt 2>&1
    tail -7 $W/ab-edges-fp8-c1-$COMMIT.txt | cut -c1-150
  else
    echo '{"before": {"tree": ".ab/c684b19"}}' > $W/v2.json
    timeout 330 python -m benchmarks.engine_ab --variants $W/v.json --out $W -- --config $CONFIG-FP8 \
      --concurrency 16 --out-tokens 64 --routing uniform > $W/ab-edges-fp8-c16-$COMMIT.txt 2>&1
    tail -7 $W/ab-edges-fp8-c16-$COMMIT.txt | cut -c1-150
    timeout $(left 585) python -m benchmarks.engine_ab --variants $W/v2.json --out $W -- --config $CONFIG \
      --concurrency 1 --out-tokens 64 --routing uniform > $W/ab-edges-bf16-c1-$COMMIT.txt 2>&1
    tail -5 $W/ab-edges-bf16-c1-$COMMIT.txt | cut -c1-150
  fi
  cd $OUT && tar czf results.tgz w; exit 0
fi
if [ "$PART" = lm-head ]; then
  timeout 60 python -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "table_linear or skinny" \
    > $W/gpu-tests-lm-head-$COMMIT.txt 2>&1
  tail -1 $W/gpu-tests-lm-head-$COMMIT.txt
  T="skinny_linear,device=NVIDIA_H200.json"
  echo "{\"n2\": {\"$T\": {\"151936,2048\": {\"1\": {\"BLOCK_N\": 2, \"BLOCK_K\": 1024, \"num_warps\": 4, \"num_stages\": 3}}}},
         \"n4\": {\"$T\": {\"151936,2048\": {\"1\": {\"BLOCK_N\": 4, \"BLOCK_K\": 2048, \"num_warps\": 8, \"num_stages\": 1}}}},
         \"n8\": {\"$T\": {\"151936,2048\": {\"1\": {\"BLOCK_N\": 8, \"BLOCK_K\": 512, \"num_warps\": 4, \"num_stages\": 3}}}}}" > $W/v.json
  timeout $(left 585) python -m benchmarks.engine_ab --variants $W/v.json --out $W -- --config $CONFIG-FP8 \
    --concurrency 1 --out-tokens 64 --routing uniform > $W/ab-lm-head-$COMMIT.txt 2>&1
  tail -7 $W/ab-lm-head-$COMMIT.txt | cut -c1-150
  cd $OUT && tar czf results.tgz w; exit 0
fi
if [ "$PART" = sampling ]; then
  for cfg in $CONFIG-FP8 $CONFIG; do
    for s in "0 1.0 0" "0.7 0.8 20"; do
      read t p k <<< "$s"; [ $(left 560) -lt 60 ] && break
      timeout $(left 575) python -m benchmarks.engine --config $cfg --concurrency 1,16 --out-tokens 64 \
        --routing uniform --temperature $t --top-p $p --top-k $k --out $W > $W/sampling-$cfg-$t.txt 2>&1
      echo "$cfg temperature $t top_p $p top_k $k"; tail -3 $W/sampling-$cfg-$t.txt | head -2 | cut -c1-150
    done
  done
  cd $OUT && tar czf results.tgz w; exit 0
fi
if [ "$PART" = sampler ]; then
  gpu_tests sampler 150 tests/test_sampling.py tests/test_isolation.py \
    -k "sampl or draw or seeded or non_finite or argmax or candidates or banned or greedy"
  echo '{"before": {"tree": ".ab/f73428f"}}' > $W/v.json
  for cfg in $CONFIG-FP8 $CONFIG; do
    [ $(left 560) -lt 150 ] && break
    timeout $(left 585) python -m benchmarks.engine_ab --variants $W/v.json --out $W -- --config $cfg \
      --concurrency $([ $cfg = $CONFIG ] && echo 1 || echo 1,16) --out-tokens 64 --routing uniform \
      --temperature 0.7 --top-p 0.8 --top-k 20 > $W/ab-sampler-$cfg-$COMMIT.txt 2>&1
    tail -7 $W/ab-sampler-$cfg-$COMMIT.txt | cut -c1-150
  done
  [ $(left 560) -gt 90 ] && timeout $(left 585) python -m benchmarks.engine --config $CONFIG-FP8 --concurrency 1,16 \
    --out-tokens 64 --routing uniform --out $W > $W/greedy-fp8-$COMMIT.txt 2>&1 && tail -3 $W/greedy-fp8-$COMMIT.txt | cut -c1-150
  cd $OUT && tar czf results.tgz w; exit 0
fi
if [ "$PART" = sample-kernel ]; then
  gpu_tests sample-kernel 150 tests/test_sampling.py tests/test_isolation.py \
    -k "sampl or draw or seeded or non_finite or argmax or candidates or banned or greedy"
  echo '{"before": {"tree": ".ab/1008b2f"}, "kernel-off": {"env": {"QWEN3VL_SAMPLE_KERNEL": "0"}}}' > $W/v.json
  echo '{"kernel-off": {"env": {"QWEN3VL_SAMPLE_KERNEL": "0"}}}' > $W/v2.json
  SAMPLED="--out-tokens 64 --routing uniform --temperature 0.7 --top-p 0.8 --top-k 20"
  timeout $(left 585) python -m benchmarks.engine_ab --variants $W/v.json --out $W -- --config $CONFIG-FP8 \
    --concurrency 1,16 $SAMPLED > $W/ab-sample-kernel-fp8-$COMMIT.txt 2>&1
  tail -9 $W/ab-sample-kernel-fp8-$COMMIT.txt | cut -c1-150
  [ $(left 560) -gt 130 ] && timeout $(left 585) python -m benchmarks.engine_ab --variants $W/v2.json --out $W -- \
    --config $CONFIG --concurrency 1 $SAMPLED > $W/ab-sample-kernel-bf16-$COMMIT.txt 2>&1 && tail -5 $W/ab-sample-kernel-bf16-$COMMIT.txt | cut -c1-150
  cd $OUT && tar czf results.tgz w; exit 0
fi
if [ "$PART" = sample-rows ]; then
  gpu_tests sample-rows 200 tests/test_gpu.py tests/test_sampling.py \
    -k "warm_up or cuda_graph_decode or greedy_matches or switches_keep or sample or sync"
  echo '{"kernel-off": {"env": {"QWEN3VL_SAMPLE_KERNEL": "0"}}}' > $W/v.json
  timeout $(left 585) python -m benchmarks.engine_ab --variants $W/v.json --out $W -- --config $CONFIG-FP8 \
    --concurrency 64,128 --out-tokens 64 --routing uniform --temperature 0.7 --top-p 0.8 --top-k 20 \
    > $W/ab-sample-rows-fp8-$COMMIT.txt 2>&1
  tail -9 $W/ab-sample-rows-fp8-$COMMIT.txt | cut -c1-150
  cd $OUT && tar czf results.tgz w; exit 0
fi
if [ "$PART" = sampler-large ] || [ "$PART" = sampler-large-bf16 ]; then
  cfg=$CONFIG-FP8; [ "$PART" = sampler-large-bf16 ] && cfg=$CONFIG
  gpu_tests $PART 150 tests/test_sampling.py tests/test_isolation.py \
    -k "sampl or logsumexp or candidates or draw or seeded or non_finite or banned or greedy"
  echo '{"before": {"tree": ".ab/af1e55a"}}' > $W/v.json
  timeout $(left 585) python -m benchmarks.engine_ab --variants $W/v.json --out $W -- --config $cfg \
    --concurrency 64,128 --out-tokens 64 --routing uniform --temperature 0.7 --top-p 0.8 --top-k 20 \
    > $W/ab-$PART-$COMMIT.txt 2>&1
  tail -9 $W/ab-$PART-$COMMIT.txt | cut -c1-150
  cd $OUT && tar czf results.tgz w; exit 0
fi
if [ "$PART" = sample-select ]; then
  cfg=$CONFIG-FP8; [ "${CFG:-FP8}" = BF16 ] && cfg=$CONFIG
  [ "${TESTS:-1}" = 1 ] && gpu_tests $PART 150 tests/test_sampling.py tests/test_isolation.py \
    -k "sampl or logsumexp or candidates or draw or seeded or non_finite or banned or greedy or threshold"
  echo '{"before": {"tree": ".ab/429c192"}}' > $W/v.json
  timeout $(left 585) python -m benchmarks.engine_ab --variants $W/v.json --out $W -- --config $cfg \
    --concurrency ${CONC:-64,128} --out-tokens 64 --routing uniform --temperature 0.7 --top-p 0.8 --top-k 20 \
    > $W/ab-$PART-$cfg-$COMMIT.txt 2>&1
  tail -9 $W/ab-$PART-$cfg-$COMMIT.txt | cut -c1-150
  cd $OUT && tar czf results.tgz w; exit 0
fi
if [ "$PART" = fp8-kv ]; then
  cfg=$CONFIG-FP8; [ "${CFG:-FP8}" = BF16 ] && cfg=$CONFIG
  [ "${TESTS:-1}" = 1 ] && gpu_tests fp8-kv 200 tests/test_gpu.py tests/test_kernels.py \
    -k "fp8_kv or fp8_cache or paged_decode or qkv_prep or cuda_graph_decode_matches_eager"
  echo '{"fp8kv": {"args": ["--kv-cache-dtype", "fp8_e4m3"]}}' > $W/v.json
  timeout $(left 585) python -m benchmarks.engine_ab --variants $W/v.json --out $W -- --config $cfg \
    --concurrency ${CONC:-1,16} --out-tokens 64 --routing uniform > $W/ab-$PART-$cfg-$COMMIT.txt 2>&1
  tail -12 $W/ab-$PART-$cfg-$COMMIT.txt | cut -c1-170
  cd $OUT && tar czf results.tgz w; exit 0
fi
if [ "$PART" = attention ]; then
  # decode attention alone at the step's shapes: launch variants over both caches (pages in order),
  # the table's against shuffled pages, then Nsight Compute on the table's launch at 128 sequences
  timeout 330 python -m benchmarks.attention_variants --out $W > $W/attention-variants-$COMMIT.txt 2>&1
  grep -E "^ *(bf16|fp8) " $W/attention-variants-$COMMIT.txt | cut -c1-120
  timeout $(left 430) python -m benchmarks.attention_variants --shuffle --variants table,t128,p1024 --out $W \
    > $W/attention-variants-shuffled-$COMMIT.txt 2>&1
  grep -E "^ *(bf16|fp8) " $W/attention-variants-shuffled-$COMMIT.txt | cut -c1-120
  timeout $(left 560) /usr/local/cuda/bin/ncu --clock-control none -k regex:_paged_decode --launch-count 4 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis python -m benchmarks.attention_variants --ncu --seqs 128 --variants table \
    > $W/ncu-attention-128-$COMMIT.txt 2>&1
  grep -E "_paged|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Theoretical Occupancy|Registers|Shared Memory Config|Block Limit|Stall|long_scoreboard|Waves" \
    $W/ncu-attention-128-$COMMIT.txt | head -60 | cut -c1-140
  cd $OUT && tar czf results.tgz w; exit 0
fi
if [ "$PART" = attention-c1 ]; then
  # batch 1 over both caches alone, then the fp8 cache's entry "1,4,8" with 32-token tiles in the step
  timeout 120 python -m benchmarks.attention_variants --seqs 1 --variants table,t32,t128,p32,p128,t32-p128 --out $W \
    > $W/attention-c1-$COMMIT.txt 2>&1
  grep -E "^ *(bf16|fp8) " $W/attention-c1-$COMMIT.txt | cut -c1-120
  PART=fp8-kv-entry CONC=1 KEY=1,4,8 ENTRY='{"PAGES_TOKENS": 32}'
fi
if [ "$PART" = fp8-kv-entry ]; then
  # a patch of the fp8 cache's decode attention entry (KEY, else CONC; ENTRY: its JSON), in the step at CONC
  echo "{\"patch\": {\"paged_decode,device=NVIDIA_H200.json\": {\"fp8\": {\"${KEY:-$CONC}\": $ENTRY}}}}" > $W/v.json
  timeout $(left 585) python -m benchmarks.engine_ab --variants $W/v.json --out $W -- --config $CONFIG-FP8 \
    --concurrency $CONC --out-tokens 64 --routing uniform --kv-cache-dtype fp8_e4m3 > $W/ab-$PART-$CONC-$COMMIT.txt 2>&1
  tail -8 $W/ab-$PART-$CONC-$COMMIT.txt | cut -c1-170
  cd $OUT && tar czf results.tgz w; exit 0
fi
if [ "$PART" = sampled-profile ]; then
  for s in "0.7 0.8 20" "0 1.0 0"; do
    read t p k <<< "$s"; [ $(left 560) -lt 100 ] && break
    mkdir -p $W/t$t
    timeout $(left 575) python -m benchmarks.engine --config $CONFIG-FP8 --concurrency 1,128 --out-tokens 32 \
      --routing uniform --temperature $t --top-p $p --top-k $k --profile --profile-at 1,128 --replay-timing \
      --out $W/t$t > $W/sampled-profile-$t-$COMMIT.txt 2>&1
    echo "temperature $t"; grep -E "replay|decode_step" $W/sampled-profile-$t-$COMMIT.txt | head -6 | cut -c1-160
  done
  cd $OUT && tar czf results.tgz w; exit 0
fi
if [ "$PART" = c1-tiles ]; then
  echo '{"patch": {"paged_decode,device=NVIDIA_H200.json": {"1,4,8": {"PAGES_TOKENS": 32, "target_programs": 128}}}}' > $W/v.json
  cfg=$CONFIG; [ "${CFG:-FP8}" = FP8 ] && cfg=$CONFIG-FP8
  for kv in $(echo ${KV:-fp8_e4m3,auto} | tr , ' '); do
    [ $(left 560) -lt 150 ] && { echo "no time left for $kv"; break; }
    timeout $(left 585) python -m benchmarks.engine_ab --variants $W/v.json --out $W -- --config $cfg \
      --concurrency 1 --out-tokens 64 --routing uniform --kv-cache-dtype $kv > $W/ab-c1-tiles-$cfg-$kv-$COMMIT.txt 2>&1
    echo "$cfg cache $kv ($(( $(date +%s) - START )) s in)"; tail -4 $W/ab-c1-tiles-$cfg-$kv-$COMMIT.txt | cut -c1-170
  done
  cd $OUT && tar czf results.tgz w; exit 0
fi
if [ "$PART" = gpu-suite ]; then
  gpu_tests suite 520 tests/test_sampling.py tests/test_kernels.py tests/test_fp8.py tests/test_gpu.py
  tail -3 $W/gpu-tests-suite-$COMMIT.txt | cut -c1-200
  cd $OUT && tar czf results.tgz w; exit 0
fi
if [ "$PART" = rows-kv ]; then
  for kv in fp8_e4m3 auto; do
    [ $(left 560) -lt 200 ] && { echo "no time left for $kv"; break; }
    timeout $(left 585) python -m benchmarks.engine --config $CONFIG-FP8 --concurrency 1,16,64,128 --out-tokens 64 \
      --routing uniform --kv-cache-dtype $kv --out $W > $W/rows-kv-$kv-$COMMIT.txt 2>&1
    echo "cache $kv ($(( $(date +%s) - START )) s in)"; tail -6 $W/rows-kv-$kv-$COMMIT.txt | cut -c1-170
  done
  cd $OUT && tar czf results.tgz w; exit 0
fi
if [ "$PART" = attention-regs ]; then
  timeout 150 python -m benchmarks.attention_variants --seqs 64,128 --variants table,r168,r128 --out $W \
    > $W/attention-regs-$COMMIT.txt 2>&1
  grep -E "^ *(bf16|fp8) " $W/attention-regs-$COMMIT.txt | cut -c1-120
  T='"paged_decode,device=NVIDIA_H200.json"'
  echo "{\"r168\": {$T: {\"fp8\": {\"64\": {\"maxnreg\": 168}, \"128\": {\"maxnreg\": 168}}}},
         \"r128\": {$T: {\"fp8\": {\"64\": {\"maxnreg\": 128}, \"128\": {\"maxnreg\": 128}}}}}" > $W/v.json
  timeout $(left 585) python -m benchmarks.engine_ab --variants $W/v.json --out $W -- --config $CONFIG-FP8 \
    --concurrency 64,128 --out-tokens 64 --routing uniform --kv-cache-dtype fp8_e4m3 > $W/ab-regs-$COMMIT.txt 2>&1
  tail -10 $W/ab-regs-$COMMIT.txt | cut -c1-170
  cd $OUT && tar czf results.tgz w; exit 0
fi
echo "unknown part $PART (packed, pack-cap, pack-images, rows, profile, vit, final, moe, step-edges, step-edges-16, lm-head, sampling, sampler, sample-kernel, sample-rows, sampler-large, sampler-large-bf16, sample-select, sampled-profile, fp8-kv, attention, fp8-kv-entry, attention-c1, c1-tiles, gpu-suite, rows-kv, attention-regs)"; exit 2
