#!/usr/bin/env bash
# One device-machine call for the runtime: GPU tests, then the offline benchmark on a random
# Llama-2-7B-shape model beside transformers generate. Writes logs under $OUT (or ./out).
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1
if ! python3 -c "import llmctl.runtime.engine" 2>/dev/null; then
  # No editable install there: link the subpackages into llmctl/ on this copy of the tree instead.
  for d in cli runtime quantize bench dockerfiles reference; do ln -sfn "../$d" "llmctl/$d"; done
  python3 -c "import llmctl.runtime.engine" || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 300 python3 -m pytest tests/runtime -q -x -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/gpu-tests.log" | tail -15
fi
if [ "${KERNEL_BENCH:-1}" = 1 ]; then
  timeout 240 python3 -m llmctl.runtime.kernels.bench_attention 2>&1 | tee "$OUT/attention.log" | tail -14
fi
MODEL=/dev/shm/llama2-7b-random
[ -f "$MODEL/config.json" ] || python3 -m llmctl.bench.random_model --shape llama2-7b --out "$MODEL" >/dev/null
python3 -m llmctl.bench.offline --model "$MODEL" ${BENCH_ARGS:-} 2>&1 | grep -v "^Loading" | tee "$OUT/offline.log" | tail -12
