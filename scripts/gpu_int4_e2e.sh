#!/usr/bin/env bash
# One device call: int4 end to end on a random Llama-2-7B-shape model quantized by llmctl (RTN, GPTQ
# format, group 128), beside the fp16 model in the same call: the offline workload and single-stream
# decode for each, then a per-step profile of batch-1 decode for each. Logs go under $OUT.
set -uo pipefail
source scripts/device_env.sh
FP16=/dev/shm/llama2-7b-random
INT4=/dev/shm/llama2-7b-random-rtn
[ -f "$FP16/tokenizer.json" ] || python3 -m llmctl.bench.random_model --shape llama2-7b --out "$FP16" --tokenizer >/dev/null || exit 1
if [ ! -f "$INT4/config.json" ]; then
  python3 -c "from llmctl.cli.main import main; main()" quantize "$FP16" "$INT4" --method rtn --group-size 128 \
    --samples 4 --seq-len 64 --eval-windows 0 --device cuda 2>&1 | tail -3
fi
du -sh "$FP16" "$INT4"
for m in ${MODELS:-$INT4 $FP16}; do
  echo "== offline $m"
  timeout 240 python3 -m llmctl.bench.offline --model "$m" --hf-batch-size 0 2>&1 | grep -v "^Loading" \
    | tee "$OUT/offline-$(basename "$m").log" | tail -4
done
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_w4a16_generate.py 2>&1 | tail -3
if [ "${PROFILE:-1}" = 1 ]; then
  for m in $INT4 $FP16; do
    echo "== batch-1 decode profile $m"
    timeout 120 python3 scripts/profile_decode.py --model "$m" --batch 1 2>&1 | grep -v "^Loading\|Warning\|warn(" | tail -14
  done
fi
