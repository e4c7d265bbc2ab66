#!/usr/bin/env bash
# GPU runs on the device machine, any number of suites in one call:
#
#     bash scripts/gpu.sh SUITE [SUITE ...]     e.g. the device tool's run(command="bash scripts/gpu.sh runtime int4")
#     source scripts/gpu.sh                      the set-up alone, before a bare `llmctl bench kernels` or
#                                                scripts/w4a16_floor.py, scripts/gpu_w4a16_bf16.py
#
# The device machine has torch, triton and transformers but no editable install of llmctl: the set-up links
# the subpackages into llmctl/ on that copy of the tree, puts the tree on PYTHONPATH, and prints the GPU and
# the library versions. Logs go under $OUT (the device tool's folder that comes back; ./out elsewhere). The
# random models are written once to /dev/shm and reused by later suites on the same machine.
#
# Suites, and the environment variables each reads:
#   runtime      GPU tests of tests/runtime (-x), the attention kernel bench, then the offline benchmark on the
#                random Llama-2-7B-shape model beside transformers generate.
#                SKIP_TESTS=1 skips the tests, PYTEST_ARGS go to pytest, TEST_TIMEOUT (480 s; the whole of
#                tests/runtime took ~400 s on an H200 in 2026-12); KERNEL_BENCH=0 skips the kernel bench;
#                BENCH_ARGS go to llmctl.bench.offline.
#   int4         `llmctl bench kernels`'s table, then the int4 kernels' GPU tests.
#                BENCH_ARGS go to `llmctl bench kernels`, BENCH_TIMEOUT (330 s) bounds it; SKIP_TESTS=1 skips
#                the tests, TESTS names them (test_w4a16.py and test_w4a16_generate.py), TEST_TIMEOUT (240 s).
#   int4-e2e     the random 7B model quantized by `llmctl quantize --method rtn --group-size 128` beside the
#                fp16 one: the offline workload and single-stream decode for each, the int4 generation test,
#                then a per-step profile of batch-1 decode for each.
#                MODELS (int4 then fp16) are the offline runs' models; CONCURRENCY (8 16 32 64): also that many
#                requests at once, 256 tokens each; PROFILE=0 skips the profiles.
#   int4-tune    `llmctl bench kernels --tune --save` for this GPU (the file comes back under $OUT: ship it in
#                runtime/kernels/w4a16/tuned/), then the RTN int4 7B model's start-up to first token on a cold
#                Triton cache without and with it. TUNE_TIMEOUT (300 s).
#   startup      issue 27's start-up to first token on a cold machine (fresh Triton cache, no user cache) for the
#                random 7B model in fp16, its RTN int4 copy (the shipped tuned file) and its FP8 copy, with the
#                runtime's start-up log. MODELS (int4 fp16 fp8); AHEAD (1; "1 0" adds LLMCTL_COMPILE_AHEAD=0);
#                PYC=1 first writes the bytecode caches of the Python packages (a built image has them).
#   gemv-tune    the start-up GEMV choices (one-row 16-bit GEMV, FP8 GEMV tiers) of the random 7B model in fp16 and
#                FP8 and of MODELS_EXTRA (e.g. /dev/shm/llama3-8b-random), written to $OUT/<GPU>.json: ship it in
#                runtime/kernels/gemv_tuned/ (choices already shipped for this GPU are read, not timed: move its
#                file away to remake it).
#   dense        issue 27's batch-1 fp16 decode: tests/runtime/test_dense_gemv.py, scripts/dense_gemv_bench.py (the
#                one-row GEMV beside cuBLAS on the 7B shapes), then the random 7B model's offline run and
#                single-stream decode with LLMCTL_DENSE_GEMV=0 (cuBLAS only) and 1.
#   serve-quant  `llmctl serve` over HTTP against the offline engine (step http), and quantizing the random 7B
#                model with 128 x 2048 calibration tokens (steps rtn gptq awq).
#                STEPS (http rtn gptq awq). The http step needs starlette, uvicorn and locust: carry them as
#                wheels in .whl (the device tool's notes say how); they are installed to /tmp/site first.
#   profile      per-step GPU profile of decode on the random 7B model. BATCHES (256 64 8), KV_DTYPES (auto; add
#                fp8 for the fp8 KV cache beside it).
#   fp8          issue 26's run: the fp8 KV-cache and FP8 GEMM GPU tests, the FP8 linear kernels' bench with
#                its GEMV sweep and decode attention on fp16 and fp8 caches (KERNEL_BENCH=0 skips both), then the random 7B model (fp16, its
#                `llmctl quantize --method fp8` copy, its RTN int4 copy) on the offline workload and single-stream
#                decode with and without an fp8 KV cache, also on a 24 GB card's KV budget (KV24_FP16, KV24_INT4
#                GiB), and the Llama-3-8B shape in fp16 and FP8 + fp8 KV. RUNS picks runs by name (fp16 fp16+fp8kv
#                fp8 fp8+fp8kv 24gb-fp16 24gb-fp16+fp8kv 24gb-int4 24gb-int4+fp8kv l3-fp16 l3-fp8+fp8kv).
#   fp8-why      where the fp8 KV cache's time goes beside fp16 (issue 26: 1.12x end to end on an H200 where the
#                decode bench gave 0.58x the attention time on an H100): decode tile shapes on both caches
#                (`attention_kernels --decode-configs`, DECODE_CONFIGS), the workload traced step by step with
#                each cache (scripts/offline_trace.py), then a batch-256 decode profile with each.
#   spec         issue 28's run: the speculative-decoding tests on the GPU, scripts/spec_bench.py (the reference
#                model, code edits and continuations, K = 3 5 8), scripts/spec_step_cost.py (a verification
#                step of 1 + K tokens beside a decode step, 7B shape, batch 1 8 32), then batch-256 throughput
#                with and without --speculative ngram (the back-off).
#   tp           issue 29's run (several GPUs): the tensor-parallel tests, the offline workload on the random 7B
#                model at TP 1 and TP N (TP, default 2; TP N with and without LLMCTL_TP_CUDA_GRAPHS=1), then a
#                random CodeLlama-34B shape at TP N, each beside transformers generate with device_map="auto" over
#                the same GPUs.
#   families     GPU tests of the family and fused-MoE code paths, the fused-MoE kernel bench, then per random
#                model shape (SHAPES: qwen3-30b-a3b qwen3-8b gemma2-9b) the offline workload beside transformers
#                generate. Each model is written to /dev/shm and deleted after its run; qwen3-30b-a3b is written
#                with LAYERS_qwen3_30b_a3b (16) of its 48 layers to fit. SKIP_TESTS=1, MOE_BENCH=0 skip parts.
#   structured   GPU tests of structured outputs (CUDA graphs and the step overlap), then
#                scripts/structured_bench.py on the random Qwen3-8B shape with the 150k byte-level tokenizer in
#                .gl/tok150k (scripts/bench_tokenizer.py makes it; carry .gl and .whl: llguidance and jsonschema
#                wheels for Python 3.12). BATCHES (64 256), BENCH_ARGS.
#
# runtime and int4 both read SKIP_TESTS and BENCH_ARGS (for different commands): one call that runs both
# suites passes the same values to each.

FP16=/dev/shm/llama2-7b-random
INT4=/dev/shm/llama2-7b-random-rtn
SUITES="runtime int4 int4-e2e int4-tune startup gemv-tune dense serve-quant profile fp8 fp8-why spec tp families structured"

setup() {
  OUT=${OUT:-out}; mkdir -p "$OUT"
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  for d in cli checkpoint runtime quantize bench dockerfiles reference; do ln -sfn "../$d" "llmctl/$d"; done
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  python3 -c "import llmctl.runtime.engine" || return 1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers as t; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', t.__version__)"
}

# gpu_file: $OUT/<this GPU's name as a file name>.json, what a tuned file made here is called (NVIDIA-H200.json)
gpu_file() {
  echo "$OUT/$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9\n' '-').json"
}

LLMCTL=(python3 -c "from llmctl.cli.main import main; main()")  # the CLI, without its console script

# random_fp16: writes the random Llama-2-7B-shape model, with its word-level tokenizer (quantize and serve need
# one), to $FP16 unless it is there.
random_fp16() {
  [ -f "$FP16/tokenizer.json" ] || python3 -m llmctl.bench.random_model --shape llama2-7b --out "$FP16" --tokenizer \
    >/dev/null
}

suite_runtime() {
  if [ "${SKIP_TESTS:-0}" != 1 ]; then
    # shellcheck disable=SC2086  # PYTEST_ARGS is a list of arguments
    timeout "${TEST_TIMEOUT:-480}" python3 -m pytest tests/runtime -q -x -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 \
      | tee "$OUT/gpu-tests.log" | tail -15
  fi
  if [ "${KERNEL_BENCH:-1}" = 1 ]; then
    timeout 240 python3 -m llmctl.bench.attention_kernels 2>&1 | tee "$OUT/attention.log" | tail -14
  fi
  random_fp16 || return 1
  # shellcheck disable=SC2086
  python3 -m llmctl.bench.offline --model "$FP16" ${BENCH_ARGS:-} 2>&1 | grep -v "^Loading" \
    | tee "$OUT/offline.log" | tail -12
}

suite_int4() {
  # shellcheck disable=SC2086
  COLUMNS=200 timeout "${BENCH_TIMEOUT:-330}" "${LLMCTL[@]}" bench kernels ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
  if [ "${SKIP_TESTS:-0}" != 1 ]; then
    # shellcheck disable=SC2086
    timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider --durations=5 \
      ${TESTS:-tests/runtime/test_w4a16.py tests/runtime/test_w4a16_generate.py} 2>&1 \
      | tee "$OUT/gpu-tests.log" | tail -15
  fi
}

suite_int4_e2e() {
  random_fp16 || return 1
  if [ ! -f "$INT4/config.json" ]; then
    "${LLMCTL[@]}" quantize "$FP16" "$INT4" --method rtn --group-size 128 --samples 4 --seq-len 64 --eval-windows 0 \
      --device cuda 2>&1 | tail -3
  fi
  du -sh "$FP16" "$INT4"
  for m in ${MODELS:-$INT4 $FP16}; do
    echo "== offline $m"
    # shellcheck disable=SC2086  # CONCURRENCY is a list of numbers
    timeout 300 python3 -m llmctl.bench.offline --model "$m" --hf-batch-size 0 --concurrency ${CONCURRENCY:-8 16 32 64} \
      2>&1 | grep -v "^Loading" | tee "$OUT/offline-$(basename "$m").log" | tail -8
  done
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_w4a16_generate.py 2>&1 | tail -3
  if [ "${PROFILE:-1}" = 1 ]; then
    for m in $INT4 $FP16; do
      echo "== batch-1 decode profile $m"
      timeout 120 python3 scripts/profile_decode.py --model "$m" --batch 1 2>&1 | grep -v "^Loading\|Warning\|warn(" \
        | tail -14
    done
  fi
}

suite_structured() {
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >"$OUT/wheels.log" 2>&1 || { tail "$OUT/wheels.log"; return 1; }
    export PYTHONPATH=$PYTHONPATH:/tmp/site
  fi
  if [ "${SKIP_TESTS:-0}" != 1 ]; then
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_structured.py tests/runtime/test_token_masks.py 2>&1 \
      | tee "$OUT/gpu-tests.log" | tail -5
  fi
  local model=/dev/shm/qwen3-8b-random
  [ -f "$model/config.json" ] || python3 -m llmctl.bench.random_model --shape qwen3-8b --out "$model" >/dev/null
  cp .gl/tok150k/* "$model/"
  # shellcheck disable=SC2086
  timeout 400 python3 scripts/structured_bench.py --model "$model" --batches ${BATCHES:-64 256} ${BENCH_ARGS:-} 2>&1 \
    | grep -v "^Loading" | tee "$OUT/structured.log" | tail -8
}

suite_serve_quant() {
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >"$OUT/wheels.log" 2>&1 || { tail "$OUT/wheels.log"; return 1; }
    export PYTHONPATH=$PYTHONPATH:/tmp/site
  fi
  random_fp16 || return 1
  for step in ${STEPS:-http rtn gptq awq}; do
    case $step in
      http) timeout 420 python3 -m llmctl.bench.http_vs_offline --model "$FP16" --out "$OUT/http" 2>&1 \
              | grep -v -E "^(Loading|INFO)" | tee "$OUT/http.log" | tail -6 ;;
      rtn|gptq|awq) timeout 400 python3 -m llmctl.bench.quantize_methods --methods "$step" --model-dir "$FP16" 2>&1 \
              | tee "$OUT/quant-$step.log" | tail -3 ;;
    esac
  done
}

suite_profile() {
  random_fp16 || return 1
  for kv in ${KV_DTYPES:-auto}; do
    for b in ${BATCHES:-256 64 8}; do
      python3 scripts/profile_decode.py --model "$FP16" --batch "$b" --kv-cache-dtype "$kv" 2>&1 \
        | grep -v "^Loading\|Warning\|warn("
    done
  done
}

# fp8_model DIR: makes one of the fp8 suite's models where it is missing (each written once per machine).
fp8_model() {
  local dir=$1 src=${1%-fp8}
  [ -f "$dir/config.json" ] && return 0
  case $src in
    "$FP16") random_fp16 || return 1 ;;
    "$INT4") random_fp16 || return 1
             timeout 600 "${LLMCTL[@]}" quantize "$FP16" "$INT4" --method rtn --group-size 128 --samples 4 \
               --seq-len 64 --eval-windows 0 --device cuda >/dev/null || return 1
             return 0 ;;
    *) [ -f "$src/tokenizer.json" ] || timeout 300 python3 -m llmctl.bench.random_model --shape llama3-8b \
         --out "$src" --tokenizer >/dev/null || return 1 ;;
  esac
  [ "$dir" = "$src" ] || timeout 600 "${LLMCTL[@]}" quantize "$src" "$dir" --method fp8 --device cuda --samples 4 \
    --seq-len 64 --eval-windows 0 >/dev/null
}

suite_fp8() {
  if [ "${SKIP_TESTS:-0}" != 1 ]; then
    timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider tests/runtime/test_fp8_kv.py \
      tests/runtime/test_fp8_kv_engine.py tests/runtime/test_fp8_linear.py tests/runtime/test_fp8_gemv.py \
      tests/runtime/test_fp8_generate.py 2>&1 | tee "$OUT/gpu-tests-fp8.log" | tail -6
  fi
  if [ "${KERNEL_BENCH:-1}" = 1 ]; then
    timeout 240 python3 -m llmctl.bench.fp8_kernels --sweep 2>&1 | tee "$OUT/fp8-kernels.log" | tail -60
    timeout 200 python3 -m llmctl.bench.attention_kernels --caches fp16 fp8 --batches 1 32 256 2>&1 \
      | tee "$OUT/attention-fp8.log" | tail -16
  fi
  # name model kv-dtype [KV GiB]: the runtime-core workload; a KV budget stands for what a 24 GB card leaves
  # (24 GB x 0.9 - weights - ~1 GiB of activations): KV24_FP16 for 13.5 GB of fp16 weights, KV24_INT4 for int4.
  local l3=/dev/shm/llama3-8b-random
  local runs=("fp16 $FP16 auto" "fp16+fp8kv $FP16 fp8" "fp8 $FP16-fp8 auto" "fp8+fp8kv $FP16-fp8 fp8"
              "24gb-fp16 $FP16 auto ${KV24_FP16:-6.5}" "24gb-fp16+fp8kv $FP16 fp8 ${KV24_FP16:-6.5}"
              "24gb-int4 $INT4 auto ${KV24_INT4:-15}" "24gb-int4+fp8kv $INT4 fp8 ${KV24_INT4:-15}"
              "l3-fp16 $l3 auto" "l3-fp8+fp8kv $l3-fp8 fp8")
  for run in "${runs[@]}"; do
    read -r name dir kv gib <<<"$run"
    [ -n "${RUNS:-}" ] && [[ " $RUNS " != *" $name "* ]] && continue
    fp8_model "$dir" || return 1
    local extra=(--kv-cache-dtype "$kv")
    [ -n "$gib" ] && extra+=(--kv-cache-memory "$gib" --requests 128)
    echo "== offline $name $(date +%T)"
    timeout 300 python3 -m llmctl.bench.offline --model "$dir" --hf-batch-size 0 "${extra[@]}" 2>&1 \
      | grep -v "^Loading" | tee "$OUT/offline-fp8-${name//+/-}.log" | tail -4
  done
}

suite_fp8_why() {
  random_fp16 || return 1
  # shellcheck disable=SC2086  # DECODE_CONFIGS is a list
  timeout 240 python3 -m llmctl.bench.attention_kernels --caches fp16 fp8 --batches 64 256 --prefill 2 512 \
    --decode-configs ${DECODE_CONFIGS:-128x4x2 128x4x1 128x4x3 64x4x2 64x4x3 64x2x4 64x8x2 128x8x2} 2>&1 \
    | grep -v prefill | tee "$OUT/attention-sweep.log"
  for kv in auto fp8; do
    echo "== trace, kv cache $kv $(date +%T)"
    timeout 200 python3 scripts/offline_trace.py --model "$FP16" --kv-cache-dtype "$kv" 2>&1 | grep -v "^Loading" \
      | tee "$OUT/trace-$kv.log" | tail -12
  done
  KV_DTYPES="auto fp8" BATCHES=256 suite_profile
}

suite_dense() {
  # issue 27's batch-1 fp16 decode: the one-row GEMV's tests, its kernel bench beside cuBLAS, then the random 7B
  # model's offline run and single-stream decode with cuBLAS only (LLMCTL_DENSE_GEMV=0) and with the start-up choice
  if [ "${SKIP_TESTS:-0}" != 1 ]; then
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_dense_gemv.py -s 2>&1 | tail -4
  fi
  timeout 200 python3 scripts/dense_gemv_bench.py 2>&1 | tee "$OUT/dense-gemv.log" | tail -8
  random_fp16 || return 1
  for on in 0 1; do
    echo "== offline fp16, LLMCTL_DENSE_GEMV=$on $(date +%T)"
    LLMCTL_DENSE_GEMV=$on timeout 300 python3 -m llmctl.bench.offline --model "$FP16" --hf-batch-size 0 2>&1 \
      | grep -v "^Loading" | tee "$OUT/offline-dense-$on.log" | tail -3
  done
}

suite_int4_tune() {
  # issue 27's start-up: a W4A16 tuned file for this GPU (what runtime/kernels/w4a16/tuned/ ships), then the
  # RTN int4 7B model's start-up to first token on a cold machine (fresh Triton cache, no user cache) without
  # it (every bucket timed) and with it
  local file
  file=$(gpu_file)
  echo "== tune $(date +%T)"
  timeout "${TUNE_TIMEOUT:-300}" "${LLMCTL[@]}" bench kernels --tune --save "$file" 2>&1 | tail -3 || return 1
  random_fp16 || return 1
  [ -f "$INT4/config.json" ] || timeout 600 "${LLMCTL[@]}" quantize "$FP16" "$INT4" --method rtn --group-size 128 \
    --samples 4 --seq-len 64 --eval-windows 0 --device cuda >/dev/null || return 1
  for with in none "$file"; do
    echo "== start-up, tuned file: $(basename "$with") $(date +%T)"
    local configs=()
    [ "$with" != none ] && configs=(LLMCTL_W4A16_CONFIGS="$with")
    env "${configs[@]}" LLMCTL_W4A16_CACHE=off LLMCTL_GEMV_CACHE=off TRITON_CACHE_DIR="$(mktemp -d)" timeout 300 \
      python3 scripts/startup_time.py --model "$INT4" --log 2>&1 | grep -E " ms  llmctl|^start-up" | cut -c1-160
  done
}

suite_gemv_tune() {
  local file dir
  file=$(gpu_file)
  for dir in "$FP16" "$FP16-fp8" ${MODELS_EXTRA:-}; do
    fp8_model "$dir" || return 1
    echo "== GEMV choices of $dir $(date +%T)"
    LLMCTL_GEMV_CACHE="$file" timeout 200 python3 scripts/startup_time.py --model "$dir" --log 2>&1 \
      | grep -E "GEMV|^start-up" | cut -c1-160
  done
  python3 -c "import json, sys; print(len(json.load(open(sys.argv[1]))), 'choices in', sys.argv[1])" "$file"
}

suite_startup() {
  local name dir ahead
  for name in ${MODELS:-int4 fp16 fp8}; do
    case $name in int4) dir=$INT4 ;; fp16) dir=$FP16 ;; fp8) dir=$FP16-fp8 ;;
                  *) echo "startup: MODELS are int4 fp16 fp8, not $name" >&2; return 1 ;; esac
    fp8_model "$dir" || return 1
  done
  if [ "${PYC:-0}" = 1 ]; then
    python3 -c "import sys, sysconfig; print(sysconfig.get_paths()['purelib'])" | xargs -I{} timeout 300 \
      python3 -m compileall -q -j 0 {} >/dev/null 2>&1
    echo "== bytecode caches written"
  fi
  for name in ${MODELS:-int4 fp16 fp8}; do
    case $name in int4) dir=$INT4 ;; fp16) dir=$FP16 ;; fp8) dir=$FP16-fp8 ;; esac
    for ahead in ${AHEAD:-1}; do
      echo "== cold start-up $name, LLMCTL_COMPILE_AHEAD=$ahead $(date +%T)"
      LLMCTL_COMPILE_AHEAD=$ahead LLMCTL_W4A16_CACHE=off LLMCTL_GEMV_CACHE=off TRITON_CACHE_DIR="$(mktemp -d)" timeout 200 \
        python3 scripts/startup_time.py --model "$dir" --log 2>&1 | grep -E " ms  llmctl|^start-up" | cut -c1-160 \
        | tee "$OUT/startup-$name-ahead$ahead.log"
    done
  done
}

suite_spec() {
  if [ "${SKIP_TESTS:-0}" != 1 ]; then
    timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider tests/runtime/test_speculative.py 2>&1 \
      | tee "$OUT/gpu-tests-spec.log" | tail -6
  fi
  timeout 300 python3 scripts/spec_bench.py --device cuda --json "$OUT/spec-bench.json" 2>&1 | tee "$OUT/spec-bench.log" | tail -10
  random_fp16 || return 1
  timeout 300 python3 scripts/spec_step_cost.py --model "$FP16" 2>&1 | tee "$OUT/spec-step-cost.log" | tail -12
  for spec in none ngram; do  # back-off: batch 256 with and without speculation (random prompts: few drafts)
    local extra=()
    [ "$spec" = ngram ] && extra=(--speculative ngram)
    echo "== offline batch 256, speculative $spec $(date +%T)"
    timeout 240 python3 -m llmctl.bench.offline --model "$FP16" --hf-batch-size 0 "${extra[@]}" 2>&1 \
      | grep -v "^Loading" | tee "$OUT/offline-spec-$spec.log" | tail -3
  done
}

suite_tp() {  # needs N GPUs (nvidia-h200-x2 or more)
  local n=${TP:-2}
  timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider tests/runtime/test_tensor_parallel.py 2>&1 \
    | tee "$OUT/gpu-tests-tp.log" | tail -6
  random_fp16 || return 1
  for run in "1 0" "$n 0" "$n 1"; do  # TP size, CUDA graphs under TP (LLMCTL_TP_CUDA_GRAPHS: off by default)
    read -r size graphs <<<"$run"
    echo "== offline llama2-7b TP $size, TP graphs $graphs $(date +%T)"
    LLMCTL_TP_CUDA_GRAPHS=$graphs timeout 300 python3 -m llmctl.bench.offline --model "$FP16" \
      --tensor-parallel-size "$size" 2>&1 | grep -v "^Loading" | tee "$OUT/offline-tp$size-g$graphs-7b.log" | tail -4
  done
  local big=/dev/shm/codellama-34b
  [ -f "$big/config.json" ] || timeout 600 python3 -m llmctl.bench.random_model --shape codellama-34b --out "$big" \
    >/dev/null || return 1
  echo "== offline codellama-34b TP $n $(date +%T)"
  timeout 500 python3 -m llmctl.bench.offline --model "$big" --tensor-parallel-size "$n" --hf-requests 16 2>&1 \
    | grep -v "^Loading" | tee "$OUT/offline-tp$n-34b.log" | tail -4
  rm -rf "$big"
}

suite_families() {
  if [ "${SKIP_TESTS:-0}" != 1 ]; then
    # the engine on the GPU's kernels for every family; the CPU-reference tests of the same file are slow here
    timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider tests/runtime/test_fused_moe.py \
      tests/runtime/test_generate_matches_hf.py -k "fused_moe or triton_kernels or sliding" 2>&1 \
      | tee "$OUT/gpu-tests-families.log" | tail -6
  fi
  if [ "${MOE_BENCH:-1}" = 1 ]; then
    timeout 240 python3 -m llmctl.bench.fused_moe_kernels 2>&1 | tee "$OUT/fused-moe.log"
  fi
  for shape in ${SHAPES:-qwen3-30b-a3b qwen3-8b gemma2-9b}; do
    local dir=/dev/shm/$shape dtype=float16 layers=() var=LAYERS_${shape//-/_}
    [ "$shape" = gemma2-9b ] && dtype=bfloat16  # Gemma 2 is released and served in bf16
    [ "$shape" = qwen3-30b-a3b ] && layers=(--layers "${!var:-16}")
    echo "== $shape ${layers[*]} $(date +%T)"
    timeout 200 python3 -m llmctl.bench.random_model --shape "$shape" --out "$dir" --dtype "$dtype" "${layers[@]}" \
      >/dev/null || return 1
    echo "== written $(date +%T)"
    timeout 420 python3 -m llmctl.bench.offline --model "$dir" --dtype "$dtype" 2>&1 | grep -v "^Loading" \
      | tee "$OUT/offline-$shape.log" | tail -5
    rm -rf "$dir"
    echo "== done $(date +%T)"
  done
}

main() {
  set -uo pipefail
  if [ $# = 0 ]; then
    sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
    exit 2
  fi
  for suite in "$@"; do
    case " $SUITES " in
      *" $suite "*) ;;
      *) echo "gpu.sh: unknown suite '$suite' (suites: $SUITES)" >&2; exit 2 ;;
    esac
  done
  setup || exit 1
  local rc=0
  for suite in "$@"; do
    echo "=== $suite"
    "suite_${suite//-/_}" || { echo "gpu.sh: suite $suite failed" >&2; rc=1; }
  done
  exit "$rc"
}

if [ "${BASH_SOURCE[0]}" != "$0" ]; then
  setup
else
  main "$@"
fi
