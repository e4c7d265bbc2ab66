"""A GPTQ / AWQ checkpoint as a dense transformers model, through llmctl's dequantizing reader.

The yardstick the tests and the quality table use: the same `dequantize_checkpoint` that the runtime
loader applies, feeding a plain transformers model, so perplexity and logits of any checkpoint
(ours or a peer's) are measured by one forward implementation.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from llmctl.checkpoint.formats import dequantize_checkpoint, quantization_config
from llmctl.checkpoint.loader import read_tensors
from llmctl.quantize.experts import stacked_for_transformers
from llmctl.quantize.layer import attention_implementation

KV_CACHE_SCALES = (".self_attn.k_scale", ".self_attn.v_scale")


def dense_model(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """A transformers CausalLM with every quantized linear replaced by its dequantized weight, and its KV cache
    (when it uses one) unquantized."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = json.loads((Path(model_dir) / "config.json").read_text())
    quant_config = quantization_config(model_dir)
    for key in ("quantization_config", "dtype", "torch_dtype"):
        config_dict.pop(key, None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention_implementation(config))
    weights = read_tensors(model_dir)
    if quant_config is not None:
        weights = dequantize_checkpoint(weights, quant_config, dtype)
    # KV-cache scales (compressed-tensors' kv_cache_scheme) serve an fp8 cache; this model keeps its keys and
    # values in its own dtype.
    state = {name: tensor.to(dtype) if tensor.is_floating_point() else tensor for name, tensor in weights
             if not name.endswith(KV_CACHE_SCALES)}
    state = stacked_for_transformers(state, config.model_type)  # MoE: one tensor per expert -> stacked
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{model_dir}: missing weights {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    return model.eval().requires_grad_(False)
