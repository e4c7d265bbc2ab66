"""The layer-by-layer driver: only one decoder layer is on the accelerator at a time.

How it thinks: the model stays in CPU memory; the calibration tokens are embedded once and then
flow through the decoder as a stream of activations that lives on the device. For layer i: move it
to the device, record its float output, let the method quantize its linears on the stream (GPTQ
and AWQ run the layer several times to see each linear's input), swap the dequantized weights in,
run the layer again, which gives layer i + 1's input, and move it back. With --kv-cache-dtype fp8 the
method's first pass, on the float weights, also measures the keys and values the layer's KV cache would
hold (kv_cache.py), as llm-compressor's calibration pass does. Layer i + 1 is calibrated
on what the quantized layers before it really produce, so it can make up for their error.

Perplexity before and after goes the same way: two streams of held-out windows, one through each
layer before it is quantized and one after, then the final norm and the LM head.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmctl.checkpoint.formats.compressed_tensors import kv_cache_scale_tensors
from llmctl.quantize.experts import Experts, moe_block
from llmctl.quantize.kv_cache import KVCacheObserver
from llmctl.quantize.layer import (
    ATTENTION_ONLY,
    LayerRunner,
    attention_implementation,
    attention_mask,
    check_layer,
    spec_for,
)
from llmctl.quantize.methods import METHODS, MethodConfig, check_shapes, gptq_settings


@dataclass
class LayerStats:
    index: int
    seconds: float
    error: float | None  # ‖y_q - y‖² / ‖y‖² of the layer's output on its calibration input
    unrouted_experts: int = 0  # MoE: experts no calibration token reached (rounded to nearest)


@dataclass
class Result:
    tensors: dict[str, torch.Tensor]  # the checkpoint, HF names
    dtype: torch.dtype  # of its dense tensors
    layers: list[LayerStats] = field(default_factory=list)
    perplexity: dict | None = None  # {"before", "after", "tokens"}
    seconds: float = 0.0
    peak_memory: dict = field(default_factory=dict)
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])  # linears left dense: LM head, MoE routers


def save_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dense tensors keep a half-precision source dtype; fp32 becomes fp16, what the int4 kernels use."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


def load_model(model_dir: str | Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmctl.quantize.export import check_source

    check_source(Path(model_dir))
    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    spec = spec_for(config)  # an unknown family fails here, before its weights are read
    # sdpa without a mask is causal attention; the calibration windows are all full, so no padding mask.
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="auto", local_files_only=True,
                                                 attn_implementation=attention_implementation(config),
                                                 low_cpu_mem_usage=True)
    for layer in model.model.layers:
        check_layer(layer, ATTENTION_ONLY if moe_block(layer) is not None else spec)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def quantize_model(model_dir: str | Path, cfg: MethodConfig, calib_ids: torch.Tensor | None,
                   eval_ids: torch.Tensor | None = None, device: str = "cpu", batch_size: int = 8,
                   on_layer: Callable[[LayerStats, int], None] | None = None,
                   on_stage: Callable[[str, int | None], None] | None = None) -> Result:
    """calib_ids: [samples, seq] (may be None for RTN); eval_ids: [windows, context] full windows.
    on_stage(name, steps) hears of each stage as it begins (steps: how many on_layer calls it brings, else
    None); on_layer(stats, layers) of each layer as it ends."""
    stage = on_stage or (lambda name, steps: None)
    start = time.perf_counter()
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    if calib_ids is None and cfg.calibrated:
        raise ValueError(f"{cfg.method} needs calibration data")
    if calib_ids is None and cfg.kv_cache_dtype != "auto":
        raise ValueError(f"--kv-cache-dtype {cfg.kv_cache_dtype} needs calibration data: its scales are measured")
    stage("loading the model", None)
    model = load_model(model_dir)
    spec = spec_for(model.config)
    if cfg.method == "awq" and any(moe_block(layer) for layer in model.model.layers):
        raise ValueError("AWQ has no scale search for Mixture-of-Experts layers here: quantize this model with "
                         "--method gptq or --method rtn")
    # CPUs are slow in half precision; on an accelerator the layer runs in the checkpoint's dtype.
    compute = torch.float32 if dev.type == "cpu" else save_dtype(model.dtype)
    result = Result(tensors={}, dtype=save_dtype(model.dtype))
    cfg = cfg.for_model(result.dtype)
    embed = _Embedder(model, dev, compute)
    x, rotary = embed(calib_ids) if calib_ids is not None else (None, None)
    held_out = _HeldOut(embed, eval_ids, batch_size) if eval_ids is not None else None
    model.model.embed_tokens.to("cpu")

    layers = model.model.layers
    stage(f"{cfg.method} layers", len(layers))
    for i, layer in enumerate(layers):
        t0 = time.perf_counter()
        layer.to(dev, compute)
        block = moe_block(layer)
        layer_spec = ATTENTION_ONLY if block is not None else spec
        kv = KVCacheObserver(result.dtype) if cfg.kv_cache_dtype == "fp8" else None
        runner = LayerRunner(layer, rotary(i) if rotary else None, batch_size, layer_spec,
                             attention_mask(model.config, i, x.shape[1], dev, compute) if x is not None else None,
                             kv_cache=kv)
        check_shapes(runner, cfg)
        if held_out:
            held_out.before = held_out.run(i, layer, held_out.before)
        weights, reference = METHODS[cfg.method](runner, x, cfg)
        for name, w in weights.items():
            runner.linears[name].weight.data = w.dequantize().to(compute)
        experts = Experts(block, model.config.model_type) if block is not None else None
        unrouted = 0
        if experts is not None:  # after the attention: the experts see its quantized output
            if cfg.method != "fp8":
                experts.check(cfg.bits, cfg.group_size)
            if cfg.method == "gptq":
                expert_weights, unrouted = experts.gptq(runner, x, gptq_settings(cfg))
            else:
                expert_weights = experts.round(cfg.round)
            weights = {**weights, **expert_weights}
            result.ignore.append(f"model.layers.{i}.{experts.router}")
        error = None
        if x is not None:
            x = runner(x)  # layer i + 1's input
            error = _relative_error(x, reference)
            del reference
        if kv is not None:
            kv.check_saw(len(x))
            result.tensors.update({f"model.layers.{i}.{name}": t for name, t in
                                   kv_cache_scale_tensors(*kv.scales(), result.dtype).items()})
        if held_out:
            held_out.after = held_out.run(i, layer, held_out.after)
        result.tensors.update(_layer_tensors(layer, f"model.layers.{i}.", weights, cfg, result.dtype, experts))
        layer.to("cpu")
        result.layers.append(LayerStats(i, time.perf_counter() - t0, error, unrouted))
        if on_layer:
            on_layer(result.layers[-1], len(layers))

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        if not name.startswith("model.layers.") and not (tied and name == "lm_head.weight"):
            result.tensors[name] = tensor.to(result.dtype).contiguous()
    if held_out:
        stage("held-out perplexity", None)
        result.perplexity = held_out.perplexity(model, dev, compute)
    result.seconds = time.perf_counter() - start
    result.peak_memory = _peak_memory(dev)
    return result


class _Embedder:
    """Token ids -> the first layer's input on the device (Gemma's embedding scales itself), and each
    layer's rotary (cos, sin) for that length: Gemma 3's local and global layers have their own."""

    def __init__(self, model, dev: torch.device, compute: torch.dtype) -> None:
        self.model, self.dev, self.compute = model.model, dev, compute
        self.model.rotary_emb.to(dev)

    def __call__(self, ids: torch.Tensor):
        hidden = self.model.embed_tokens.to(self.dev)(ids.to(self.dev)).to(self.compute)  # [n, seq, hidden]
        positions = torch.arange(ids.shape[1], device=self.dev)[None]
        types = getattr(self.model.config, "layer_types", None)
        if self.model.config.model_type == "gemma3_text":
            tables = {t: self.model.rotary_emb(hidden[:1], positions, t) for t in set(types)}
            return hidden, lambda i: tables[types[i]]
        table = self.model.rotary_emb(hidden[:1], positions)
        return hidden, lambda i: table


class _HeldOut:
    """Two streams of held-out windows: through each layer before it is quantized and after."""

    def __init__(self, embed: _Embedder, eval_ids: torch.Tensor, batch_size: int) -> None:
        self.ids, self.batch_size, self.embed = eval_ids, batch_size, embed
        self.before, self.rotary = embed(eval_ids[:, :-1])  # each window predicts its own next tokens
        self.after = self.before.clone()

    def run(self, index: int, layer, hidden: torch.Tensor) -> torch.Tensor:
        mask = attention_mask(self.embed.model.config, index, hidden.shape[1], hidden.device, hidden.dtype)
        return LayerRunner(layer, self.rotary(index), self.batch_size, mask=mask)(hidden)

    def perplexity(self, model, dev, compute) -> dict:
        norm, head = model.model.norm.to(dev, compute), model.lm_head.to(dev, compute)
        cap = getattr(model.config, "final_logit_softcapping", None)
        scored = self.ids[:, 1:].numel()
        out = {"tokens": scored}
        for key, hidden in (("before", self.before), ("after", self.after)):
            nll = 0.0
            for h, ids in zip(hidden.split(1), self.ids.split(1)):
                logits = head(norm(h)).float()  # [1, context - 1, vocab]
                if cap:  # Gemma 2 caps the logits, as its forward does
                    logits = torch.tanh(logits / cap) * cap
                nll += torch.nn.functional.cross_entropy(logits[0], ids[0, 1:].to(dev), reduction="sum").item()
            out[key] = math.exp(nll / scored)
        norm.to("cpu")
        head.to("cpu")
        return out


def _relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    """‖y - ref‖² / ‖ref‖², a sample at a time: float32 copies of the whole stream would double its memory."""
    num = den = 0.0
    for a, b in zip(y.split(1), reference.split(1)):
        num += (a.float() - b.float()).pow(2).sum().item()
        den += b.float().pow(2).sum().item()
    return num / den


def _layer_tensors(layer, prefix: str, weights: dict, cfg: MethodConfig, dtype: torch.dtype,
                   experts: Experts | None) -> dict[str, torch.Tensor]:
    """The layer's packed linears (every expert's too, under the checkpoint's per-expert names) and its
    other parameters (norms, biases: AWQ may have rescaled them; an MoE router)."""
    out = {}
    for name, weight in weights.items():
        for suffix, tensor in cfg.pack(weight, dtype).items():
            out[f"{prefix}{name}.{suffix}"] = tensor.cpu()
    quantized = {f"{name}.weight" for name in weights} | {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}
    for name, tensor in layer.state_dict().items():
        if name not in quantized:
            out[prefix + (experts.renamed(name) if experts else name)] = tensor.to("cpu", dtype).contiguous()
    return out


def _peak_memory(dev: torch.device) -> dict:
    if dev.type == "cuda":
        return {"device": str(dev), "max_memory_allocated_bytes": torch.cuda.max_memory_allocated(dev)}
    # ru_maxrss is in KiB on Linux: the process's peak, model in CPU memory included.
    return {"device": "cpu", "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
