"""`quant_method: fp8`: FP8 releases in transformers' FineGrainedFP8 layout (DeepSeek-V3, Qwen3-FP8, MiniMax)
and per-tensor fp8 checkpoints, read as transformers dequantizes them.

    weight            [out, in] float8_e4m3fn
    weight_scale_inv  [ceil(out/b0), ceil(in/b1)] float32 (float8_e8m0fnu where scale_fmt is "ue8m0"):
                      one scale per block of weight_block_size = [b0, b1] (transformers' default: [128, 128]);
                      a single value: one scale for the tensor
    weight_scale      one float32: the per-tensor name of vLLM-style checkpoints
    input_scale       one float32, activation_scheme "static" (transformers calls it activation_scale)

W = weight * scale in fp32 (`weight_scale_inv` multiplies, whatever its name says), rounded to the model's
dtype when loaded, as transformers' Fp8Dequantize computes it. A dense linear's `weight` has the same name
as a quantized one: only a one-byte `weight` is claimed, and modules_to_not_convert (alias ignored_layers)
must not name a module that stores one.
"""

from __future__ import annotations

import math
import re

import torch

from llmctl.checkpoint.formats.weights import PROJECTIONS, Fp8Weight

FLOAT8 = torch.float8_e4m3fn
WEIGHT_SCALES = ("weight_scale_inv", "weight_scale")
INPUT_SCALES = ("input_scale", "activation_scale")
UE8M0 = getattr(torch, "float8_e8m0fnu", None)  # ue8m0 scales' dtype, in torch >= 2.7
SCALE_DTYPES = tuple(d for d in (torch.float32, torch.bfloat16, torch.float16, UE8M0) if d is not None)
FP8_BLOCK = (128, 128)  # the block the runtime's FP8 GEMMs take


class FP8:
    runs_int4 = False

    def __init__(self, quant_config: dict) -> None:
        scheme = str(quant_config.get("activation_scheme", "dynamic")).lower()
        if scheme not in ("dynamic", "static"):
            raise ValueError(f"fp8 activation_scheme {scheme!r}: llmctl reads dynamic and static")
        self.static = scheme == "static"
        fmt = quant_config.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ValueError(f"fp8 fmt {fmt!r}: llmctl reads e4m3 weights")
        scale_fmt = quant_config.get("scale_fmt", "float")
        if scale_fmt not in ("float", "ue8m0"):
            raise ValueError(f"fp8 scale_fmt {scale_fmt!r}: llmctl reads float and ue8m0 scales")
        if quant_config.get("modules_to_convert"):
            raise ValueError("fp8 modules_to_convert is set: llmctl does not read FP8 embedding tables")
        block = quant_config.get("weight_block_size", (128, 128))
        if block is not None and (len(block) != 2 or not all(isinstance(v, int) and v > 0 for v in block)):
            raise ValueError(f"fp8 weight_block_size {block!r}: two positive integers expected")
        self.block = tuple(block) if block is not None else None
        skip = quant_config.get("modules_to_not_convert")
        self.skip = list(skip if skip is not None else quant_config.get("ignored_layers") or [])
        self.runs_fp8 = self.block in (None, FP8_BLOCK) and all(should_convert(p, self.skip) for p in PROJECTIONS)

    def claims(self, part: str, tensor: torch.Tensor) -> bool:
        # A one-byte weight is FP8 (or a layout refused when read); a dense linear's passes through.
        if part == "weight":
            return tensor.element_size() == 1
        return part in WEIGHT_SCALES or part in INPUT_SCALES

    def ready(self, parts: dict) -> bool:
        return ("weight" in parts and any(s in parts for s in WEIGHT_SCALES)
                and (not self.static or any(s in parts for s in INPUT_SCALES)))

    def read(self, module: str, parts: dict) -> Fp8Weight:
        if not self.ready(parts):
            raise ValueError(f"quantized weight {module!r} is incomplete: found only "
                             f"{', '.join(sorted(parts))}")
        if not should_convert(module, self.skip):
            raise ValueError(f"{module!r} stores FP8 tensors but fp8 modules_to_not_convert lists it")
        names = [s for s in WEIGHT_SCALES if s in parts]
        inputs = [s for s in INPUT_SCALES if s in parts]
        extra = names[1:] + (inputs[1:] if self.static else inputs)
        if extra:
            raise ValueError(f"{module!r} also stores {', '.join(extra)} (activation_scheme "
                             f"{'static' if self.static else 'dynamic'})")
        weight, scale = parts["weight"], parts[names[0]]
        if weight.dtype != FLOAT8:
            raise ValueError(f"{module}.weight is {weight.dtype}; llmctl reads {FLOAT8} weights")
        if scale.dtype not in SCALE_DTYPES:
            raise ValueError(f"{module}.{names[0]} is {scale.dtype}; llmctl reads float and ue8m0 scales")
        input_scale = _scalar(module, inputs[0], parts[inputs[0]]) if inputs else None
        if scale.numel() == 1:
            return Fp8Weight(weight, scale.float().reshape(1, 1), None, input_scale)
        out, inp = weight.shape
        if self.block is None or tuple(scale.shape) != (math.ceil(out / self.block[0]),
                                                        math.ceil(inp / self.block[1])):
            raise ValueError(f"{module}.{names[0]} has shape {list(scale.shape)}: neither one scale nor one "
                             f"per block of weight_block_size {self.block} over [{out}, {inp}]")
        return Fp8Weight(weight, scale.float(), self.block, input_scale)


def should_convert(module: str, skip: list[str]) -> bool:
    """transformers' `should_convert_module`: a skip entry names the module as a prefix, a regex matched at
    its start, or a suffix."""
    return not any(re.match(f"{key}\\.", module) or re.match(key, module) or module.endswith(key)
                   for key in skip)


def _scalar(module: str, name: str, t: torch.Tensor) -> torch.Tensor:
    if t.numel() != 1:
        raise ValueError(f"{module}.{name} has shape {list(t.shape)}; one activation scale expected")
    return t.float().reshape(())
