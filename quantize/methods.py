"""Each method applied to one decoder layer: x (the layer's calibration input) -> its quantized linears.

A method may change the layer's float weights on the way (AWQ folds scales into the norms and
linears); the pipeline saves whatever the layer holds afterwards. Linears come back as
QuantizedWeight (Fp8Weight for fp8); the pipeline swaps their dequantized weights in and runs the layer
for the next input. Each method also returns the float layer's output on x (None without calibration
data), which its first pass computes anyway; the pipeline measures the quantized layer's error against it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import torch

from llmctl.checkpoint.formats.awq import awq_config, awq_tensors
from llmctl.checkpoint.formats.compressed_tensors import (
    compressed_tensors_config,
    compressed_tensors_tensors,
    float_quantized_tensors,
    fp8_dynamic_config,
    fp8_kv_cache_scheme,
)
from llmctl.checkpoint.formats.gptq import gptq_config, gptq_tensors
from llmctl.checkpoint.formats.weights import Fp8Weight, QuantizedWeight
from llmctl.quantize import awq
from llmctl.quantize.fp8 import fp8_channel
from llmctl.quantize.gptq import GPTQConfig, Hessian, gptq
from llmctl.quantize.grid import check_grid, rtn
from llmctl.quantize.layer import LayerRunner

AWQ_SEARCH_TOKENS = 128 * 512  # the scale search scores on at most this many tokens (AutoAWQ's default set)


LayerResult = tuple[dict[str, QuantizedWeight | Fp8Weight], torch.Tensor | None]


FORMATS = ("native", "compressed-tensors")  # native: GPTQ v1 for gptq and rtn, AWQ GEMM for awq
KV_CACHE_DTYPES = ("auto", "fp8")  # auto: no KV-cache scales; fp8: calibrated e4m3 scales, one a layer for k and v
# What fp8 has no use for (its grid is FP8's, one scale per output channel): the option that sets each, and
# the value that means "not given".
NOT_FOR_FP8 = {"bits": ("--bits", None), "group_size": ("--group-size (or LLMCTL_QUANT_GROUP_SIZE)", None),
               "sym": ("--sym/--asym", None),
               "desc_act": ("--desc-act", False), "static_groups": ("--static-groups", False),
               "damp_percent": ("--damp-percent", None)}


@dataclass(frozen=True)
class MethodConfig:
    """A method and its settings; a setting left None takes the method's default (4 bits, groups of 128,
    symmetric but for awq, the native format; fp8: FP8 weights, one scale per row, compressed-tensors).
    kv_cache_dtype fp8 adds calibrated KV-cache scales, which only compressed-tensors has a place for."""

    method: str
    bits: int | None = None
    group_size: int | None = None
    sym: bool | None = None
    desc_act: bool = False
    static_groups: bool = False
    damp_percent: float | None = None
    true_sequential: bool = True
    format: str | None = None
    kv_cache_dtype: str = "auto"
    scale_dtype: torch.dtype = torch.float16  # what the checkpoint stores scales in (for_model sets it)

    def __post_init__(self) -> None:
        if self.method not in ("awq", "gptq", "rtn", "fp8"):
            raise ValueError(f"method must be awq, gptq, rtn or fp8, got {self.method!r}")
        if self.method == "fp8":
            self._fp8_defaults()
        else:
            self._grid_defaults()
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"--kv-cache-dtype must be {' or '.join(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.kv_cache_dtype == "fp8" and self.format != "compressed-tensors":
            native = "AWQ GEMM" if self.method == "awq" else "GPTQ v1"
            raise ValueError(f"--kv-cache-dtype fp8 needs --format compressed-tensors: the native {native} format "
                             "has no place for KV-cache scales")

    def _grid_defaults(self) -> None:
        for name, default in (("bits", 4), ("group_size", 128), ("sym", self.method != "awq"),
                              ("damp_percent", 0.01), ("format", "native")):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        if self.bits not in (2, 4, 8) or (self.method == "awq" and self.bits != 4):
            raise ValueError(f"bits must be 4 for awq and 2, 4 or 8 otherwise, got {self.bits} for {self.method}")
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group size must be positive or -1 (one group per row), got {self.group_size}")
        if self.method != "gptq" and (self.desc_act or self.static_groups):
            raise ValueError(f"--desc-act and static groups are GPTQ options; {self.method} has no act-order")
        if not 0 < self.damp_percent < 1:
            raise ValueError(f"damp percent must be in (0, 1), got {self.damp_percent}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.format == "compressed-tensors":
            if self.bits not in (4, 8):
                raise ValueError(f"compressed-tensors pack-quantized checkpoints are 4 or 8 bits, got {self.bits}")
            if self.desc_act and not self.static_groups:
                raise ValueError("compressed-tensors stores no act-order groups (llm-compressor dropped them): "
                                 "add --static-groups to --desc-act, or write the native GPTQ format")

    def _fp8_defaults(self) -> None:
        """fp8 takes no grid settings: one given is refused by its option's name, not ignored."""
        for name, (option, unset) in NOT_FOR_FP8.items():
            if getattr(self, name) is not unset:
                raise ValueError(f"--method fp8 takes no {option}: its weights are FP8 (e4m3) with one scale per "
                                 "output channel")
        if self.format not in (None, "compressed-tensors"):
            raise ValueError(f"--method fp8 writes the compressed-tensors format (float-quantized), not "
                             f"{self.format!r} (from --format or LLMCTL_QUANT_FORMAT)")
        object.__setattr__(self, "format", "compressed-tensors")

    def for_model(self, dtype: torch.dtype) -> MethodConfig:
        """This config for a model saved in dtype: compressed-tensors stores scales in the model's dtype."""
        return replace(self, scale_dtype=dtype if self.format == "compressed-tensors" else torch.float16)

    @property
    def calibrated(self) -> bool:
        """Whether the method needs calibration data (RTN and FP8 round each weight on its own)."""
        return self.method in ("awq", "gptq")

    @property
    def min_zero(self) -> int:
        # GPTQ v1 stores zero - 1 (grid.fit); AWQ and compressed-tensors store zero points as they are.
        return 1 if self.method != "awq" and self.format == "native" else 0

    def quantization_config(self, ignore: tuple[str, ...] = ("lm_head",)) -> dict:
        """What goes into config.json: natively, RTN and GPTQ write GPTQ v1 and AWQ writes AWQ GEMM.
        ignore: the linears left dense, which compressed-tensors lists (the LM head, MoE routers)."""
        if self.format == "compressed-tensors":
            config = (fp8_dynamic_config(ignore) if self.method == "fp8"
                      else compressed_tensors_config(self.bits, self.group_size, self.sym, ignore))
            if self.kv_cache_dtype == "fp8":
                config["kv_cache_scheme"] = fp8_kv_cache_scheme()
            return config
        if self.method == "awq":
            return awq_config(self.bits, self.group_size)
        return gptq_config(self.bits, self.group_size, self.sym, self.desc_act, self.static_groups,
                           self.damp_percent, self.true_sequential)

    def pack(self, weight: QuantizedWeight | Fp8Weight, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """One linear's checkpoint tensors; dtype: the model's, which compressed-tensors stores scales in."""
        if self.method == "fp8":
            return float_quantized_tensors(weight, dtype)
        if self.format == "compressed-tensors":
            return compressed_tensors_tensors(weight, self.sym, dtype)
        return awq_tensors(weight) if self.method == "awq" else gptq_tensors(weight)

    def round(self, w: torch.Tensor) -> QuantizedWeight | Fp8Weight:
        """w: [out, in] rounded to the nearest point of this config's grid: all of RTN and FP8, AWQ's last step."""
        if self.method == "fp8":
            return fp8_channel(w, self.scale_dtype)
        return rtn(w, self.bits, self.group_size, self.sym, self.min_zero, self.scale_dtype)


def check_shapes(runner: LayerRunner, cfg: MethodConfig) -> None:
    if cfg.method == "fp8":  # a scale per row fits any shape
        return
    for name, fc in runner.linears.items():
        try:
            check_grid(cfg.bits, cfg.group_size, fc.in_features)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        if cfg.method == "awq" and fc.out_features % 8:
            raise ValueError(f"{name}: AWQ GEMM packs 8 output channels per word; {fc.out_features} is not a multiple of 8")


def _round_all(runner: LayerRunner, cfg: MethodConfig) -> dict[str, QuantizedWeight | Fp8Weight]:
    return {name: cfg.round(fc.weight) for name, fc in runner.linears.items()}


def round_layer(runner: LayerRunner, x: torch.Tensor | None, cfg: MethodConfig) -> LayerResult:
    """RTN and FP8: each linear rounded on its own; x only gives the float output the error is measured on."""
    return _round_all(runner, cfg), runner(x) if x is not None else None


def gptq_settings(cfg: MethodConfig) -> GPTQConfig:
    return GPTQConfig(cfg.bits, cfg.group_size, cfg.sym, cfg.desc_act, cfg.static_groups, cfg.damp_percent,
                      min_zero=cfg.min_zero, scale_dtype=cfg.scale_dtype)


def gptq_layer(runner: LayerRunner, x: torch.Tensor, cfg: MethodConfig) -> LayerResult:
    gcfg = gptq_settings(cfg)
    results: dict[str, QuantizedWeight] = {}
    reference = None
    spec = runner.spec
    for names in spec.sequential if cfg.true_sequential else (spec.linears,):
        owners = [n for n in names if n not in spec.shared_input]
        hessians = {n: Hessian(runner.linears[n].in_features, x.device) for n in owners}
        accumulate = partial(_add_to, hessians)
        if reference is None:  # the first pass, on float weights, also gives the layer's float output
            with runner.input_hooks(owners, accumulate):
                reference = runner(x)
        else:
            runner.feed(x, owners, accumulate)
        for owner in owners:
            # Linears that share an input share H, and GPTQ treats rows independently given H, so
            # q/k/v (and gate/up) go through one sweep as one stacked matrix: fewer column steps.
            sharing = [n for n in names if spec.shared_input.get(n, n) == owner]
            stacked = torch.cat([runner.linears[n].weight for n in sharing])  # [sum(out), in]
            quantized, _ = gptq(stacked, hessians[owner].H, gcfg)
            parts = quantized.split_rows([runner.linears[n].out_features for n in sharing])
            for name, part in zip(sharing, parts):
                results[name] = part
                runner.linears[name].weight.data = part.dequantize().to(runner.linears[name].weight.dtype)
    return results, reference


def _add_to(hessians: dict[str, Hessian], name: str, inp: torch.Tensor) -> None:
    hessians[name].add(inp)


def awq_layer(runner: LayerRunner, x: torch.Tensor, cfg: MethodConfig) -> LayerResult:
    layer, fc, spec = runner.layer, runner.linears, runner.spec
    qkv = ["self_attn.qkv_proj"] if spec.fused else ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    gate_up = ["mlp.gate_up_proj"] if spec.fused else ["mlp.gate_proj", "mlp.up_proj"]
    q, o, gate, down = qkv[0], "self_attn.o_proj", gate_up[0], "mlp.down_proj"
    owners = (q, o, gate, down)
    keep = max(1, AWQ_SEARCH_TOKENS // x.shape[1])  # samples whose inputs the searches score on
    kept: dict[str, list[torch.Tensor]] = {n: [] for n in owners}
    abs_sum = {n: torch.zeros(fc[n].in_features, device=x.device) for n in owners}

    def capture(name: str, inp: torch.Tensor) -> None:  # inp: [chunk, seq, in]
        abs_sum[name] += inp.abs().float().sum(dim=(0, 1))
        have = sum(len(t) for t in kept[name])
        if have < keep:
            kept[name].append(inp[: keep - have].clone())

    with runner.input_hooks(owners, capture):
        reference = runner(x)
    feats = {n: torch.cat(kept[n]) for n in owners}
    x_mean = {n: abs_sum[n] / (x.shape[0] * x.shape[1]) for n in owners}

    # Each group: the op whose output the linears read (its last output rows, for a linear: v of q/k/v,
    # the up half of Phi-3's gate_up), the linears, the float block scored, the owner of the inputs.
    groups = [(layer.input_layernorm, qkv, runner.attention, q)]
    if not spec.fused and fc["self_attn.v_proj"].weight.shape == fc[o].weight.shape:  # v's outputs are o's inputs
        groups.append((fc["self_attn.v_proj"], [o], fc[o], o))
    groups.append((layer.get_submodule(spec.mlp_norm), gate_up, runner.mlp, gate))
    groups.append((fc[gate_up[-1]], [down], fc[down], down))
    for prev, names, block, owner in groups:
        linears = [fc[n] for n in names]
        s = awq.search_scale(awq.ScaleGroup(prev, linears, block, feats[owner], x_mean[owner]),
                             cfg.bits, cfg.group_size, cfg.sym, cfg.scale_dtype)
        awq.apply_scale(prev, linears, s, plus_one=spec.norm_plus_one)
        feats[owner] /= s.to(feats[owner].dtype)  # the linears now read x / s
    for name in spec.linears:
        if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.qkv_proj"):
            continue
        max_val = awq.search_clip(fc[name].weight, feats[spec.shared_input.get(name, name)], cfg.bits,
                                  cfg.group_size, cfg.sym, scale_dtype=cfg.scale_dtype)
        awq.apply_clip(fc[name], max_val)
    return _round_all(runner, cfg), reference


METHODS = {"rtn": round_layer, "fp8": round_layer, "gptq": gptq_layer, "awq": awq_layer}
