#!/usr/bin/env bash
# One device-machine call: `llmctl serve` over HTTP against the offline engine (STEPS has http), and
# quantizing a random Llama-2-7B-shape model with 128 x 2048 calibration tokens (STEPS has rtn gptq awq).
# Carry .whl (starlette, uvicorn, locust and their needs) for the http step. Logs go under $OUT.
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
STEPS=${STEPS:-http rtn gptq awq}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$OUT/wheels.log" 2>&1 || { tail "$OUT/wheels.log"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
source scripts/device_env.sh
MODEL=/dev/shm/llama2-7b-random
if [ ! -f "$MODEL/tokenizer.json" ]; then
  python3 -m llmctl.bench.random_model --shape llama2-7b --out "$MODEL" --tokenizer >/dev/null || exit 1
fi
for step in $STEPS; do
  case $step in
    http) timeout 420 python3 -m llmctl.bench.http_vs_offline --model "$MODEL" --out "$OUT/http" 2>&1 \
            | grep -v -E "^(Loading|INFO)" | tee "$OUT/http.log" | tail -6 ;;
    rtn|gptq|awq) timeout 400 python3 -m llmctl.quantize.bench --methods "$step" --model-dir "$MODEL" 2>&1 \
            | tee "$OUT/quant-$step.log" | tail -3 ;;
  esac
done
