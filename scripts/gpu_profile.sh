#!/usr/bin/env bash
# One device call: per-step GPU profile of decode at a few batch sizes on the random 7B model.
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
for d in cli runtime quantize bench dockerfiles reference; do ln -sfn "../$d" "llmctl/$d"; done
MODEL=/dev/shm/llama2-7b-random
[ -f "$MODEL/config.json" ] || python3 -m llmctl.bench.random_model --shape llama2-7b --out "$MODEL" >/dev/null 2>&1
for b in ${BATCHES:-256 64 8}; do python3 scripts/profile_decode.py --model "$MODEL" --batch "$b" 2>&1 | grep -v "^Loading\|Warning\|warn("; done
