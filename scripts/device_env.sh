# Sourced by the scripts/gpu_*.sh device calls: makes `llmctl.*` importable on the device machine's copy
# of the tree (no editable install there: the subpackages are linked into llmctl/) and sets $OUT.
OUT=${OUT:-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
for d in cli runtime quantize bench dockerfiles reference; do ln -sfn "../$d" "llmctl/$d"; done
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import llmctl.runtime.engine" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers as t; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', t.__version__)"
