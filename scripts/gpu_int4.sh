#!/usr/bin/env bash
# One device-machine call for the int4 kernels: their GPU tests (the generation test included), then
# `llmctl bench kernels`'s table. Logs go under $OUT (or ./out).
set -uo pipefail
source scripts/device_env.sh
export COLUMNS=200
timeout "${BENCH_TIMEOUT:-330}" python3 -c "from llmctl.cli.main import main; main()" bench kernels ${BENCH_ARGS:-} \
  2>&1 | tee "$OUT/bench.log"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider --durations=5 \
    ${TESTS:-tests/runtime/test_w4a16.py tests/runtime/test_w4a16_generate.py} 2>&1 | tee "$OUT/gpu-tests.log" | tail -15
fi
