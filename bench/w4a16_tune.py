"""Make a W4A16 tuned file for this GPU: `llmctl bench kernels --tune --save FILE [--model DIR]`.

Times every candidate for every M bucket (1, 2, 4 ... --max-m) of each int4 weight shape, whatever the
caches and shipped files hold, and writes the choices as a tuned file for this GPU's name
(`runtime/kernels/w4a16/configs.py` says where the runtime finds them; `build-image --kernel-configs` bakes
one into an image). The shapes are those the runtime builds from a model's config.json (q | k | v and
gate | up fused, each module alone for act-order), or, without a model, the Llama-2-7B and Llama-3-8B ones
that ship. Random weights stand in for the model's: a choice depends on the shape, the group size,
act-order and the activation dtype, never on the values.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from llmctl.bench.w4a16_kernels import random_packed
from llmctl.runtime.kernels.w4a16 import Config, configs, dispatch

# (K, N) of the fused projections: qkv, o, gate_up, down
LLAMA2_7B = [(4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096)]
LLAMA3_8B = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]


def model_shapes(model_dir: str | Path) -> tuple[list[tuple[int, int]], int, bool]:
    """([(K, N)], group size, act-order) of the int4 linears the runtime builds for a model's config.json;
    the experts of an MoE model run the fused-MoE kernels and are left out."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    quant = config.get("quantization_config") or {}
    text = config.get("text_config", config)
    try:
        hidden, heads = text["hidden_size"], text["num_attention_heads"]
        kv_heads = text.get("num_key_value_heads") or heads
        head_dim = text.get("head_dim") or hidden // heads
        inter = text["intermediate_size"]
    except KeyError as exc:
        raise ValueError(f"{path} has no {exc.args[0]}: not a decoder config llmctl knows") from None
    group = int(quant.get("group_size", 128))
    act_order = bool(quant.get("desc_act", False))
    q, kv = heads * head_dim, kv_heads * head_dim
    attn = [(hidden, q), (hidden, kv), (q, hidden)] if act_order else [(hidden, q + 2 * kv), (q, hidden)]
    moe = text.get("num_experts") or text.get("num_local_experts") or text.get("n_routed_experts")
    mlp = [] if moe else [(hidden, inter), (inter, hidden)] if act_order else [(hidden, 2 * inter), (inter, hidden)]
    return sorted(set(attn + mlp)), group, act_order


def make_tuned_file(path: str | Path, shapes: list[tuple[int, int]], group_size: int, act_order: bool,
                    dtype: torch.dtype, max_m: int, print_fn=print) -> dict[str, Config]:
    """Tune every bucket of each shape, write the tuned file (merged with the file's choices for this GPU
    when it exists, so one file can gather several models) and return the new choices."""
    path, gpu = Path(path), configs.gpu_name()
    for k, _ in shapes:
        if k % group_size:
            raise ValueError(f"K = {k} is not a multiple of the group size {group_size}")
    start = time.perf_counter()
    made: dict[str, Config] = {}
    for k, n in shapes:
        torch.manual_seed(0)
        made.update(dispatch.tune_all([random_packed(k, n, group_size, act_order)], dtype, max_m))
        print_fn(f"# {k}x{n}: tuned, {time.perf_counter() - start:.0f} s so far")
    kept = {}
    if path.exists():
        old_gpu, version, kept = configs.read_tuned(path)
        if old_gpu != gpu:
            raise ValueError(f"{path} was tuned on {old_gpu}, not on this {gpu}: save to another file")
        kept = kept if version == configs.KERNELS_VERSION else {}  # older kernels' choices are dropped
    configs.write_tuned(path, gpu, {**kept, **made})
    return made
