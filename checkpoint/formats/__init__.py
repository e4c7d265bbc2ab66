"""Quantized checkpoint formats: which one a model directory holds, and its tensors as layout-neutral weights.

    weights.py             QuantizedWeight (integer codes on a grid) and Fp8Weight: what every format reads into
    packing.py             int32 packing shared by the integer formats
    gptq.py                GPTQ v1 / v2 (AutoGPTQ, GPTQModel), 2, 4 and 8 bits, act-order, AutoGPTQ's bias tensors
    awq.py                 AWQ GEMM (AutoAWQ)
    compressed_tensors.py  llm-compressor's compressed-tensors: pack-quantized int, float-quantized FP8
    fp8.py                 `quant_method: fp8` releases: per-tensor and block-wise scales

A format is an object with `claims(part, tensor)` (is `<module>.<part>` a piece of a quantized linear?),
`ready(parts)` (are all its pieces in?), `read(module, parts)` (the neutral weight; the pieces still pending
at the end are read too, or refused as incomplete) and `runs_int4` (every quantized linear is a 4-bit
integer layout that the runtime's W4A16 kernels take). `read_quantized` walks a checkpoint's tensors with
it: a module's pieces may come in any order and from different shards, so each is held until it is whole.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

import torch

from llmctl.checkpoint.formats.weights import Fp8Weight, QuantizedWeight

Neutral = QuantizedWeight | Fp8Weight


class Format(Protocol):
    runs_int4: bool

    def claims(self, part: str, tensor: torch.Tensor) -> bool: ...

    def ready(self, parts: dict[str, torch.Tensor]) -> bool: ...

    def read(self, module: str, parts: dict[str, torch.Tensor]) -> Neutral: ...


def quantization_config(model_dir: str | Path) -> dict | None:
    """The checkpoint's quantization settings: config.json's `quantization_config`, or else the
    `quantize_config.json` that older AutoGPTQ checkpoints carry alone (GPTQ unless it says otherwise)."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text()).get("quantization_config")
    if config:
        return config
    legacy = model_dir / "quantize_config.json"
    if legacy.is_file():
        return {"quant_method": "gptq", **json.loads(legacy.read_text())}
    return None


def format_for(quant_config: dict) -> Format:
    """The reader of a `quantization_config`; ValueError naming the field for what llmctl cannot read."""
    method = quant_config.get("quant_method")
    if method == "gptq":
        from llmctl.checkpoint.formats.gptq import GPTQ

        return GPTQ(quant_config)
    if method == "awq":
        from llmctl.checkpoint.formats.awq import AWQ

        return AWQ(quant_config)
    if method == "compressed-tensors":
        from llmctl.checkpoint.formats.compressed_tensors import CompressedTensors

        return CompressedTensors(quant_config)
    if method == "fp8":
        from llmctl.checkpoint.formats.fp8 import FP8

        return FP8(quant_config)
    raise ValueError(f"unsupported quant_method {method!r}; llmctl loads gptq, awq, compressed-tensors and fp8 "
                     "checkpoints")


def runs_int4(quant_config: dict | None) -> bool:
    """Whether every quantized linear of the checkpoint is a layout the W4A16 kernels take."""
    return quant_config is not None and format_for(quant_config).runs_int4


def runs_fp8(quant_config: dict | None) -> bool:
    """Whether every quantized linear of the checkpoint is an FP8 weight (an Fp8Weight)."""
    return quant_config is not None and getattr(format_for(quant_config), "runs_fp8", False)


def read_quantized(weights: Iterable[tuple[str, torch.Tensor]], quant_config: dict
                   ) -> Iterator[tuple[str, torch.Tensor | Neutral]]:
    """A checkpoint's tensors with each quantized linear's pieces (`x.qweight` & co.) read into one neutral
    weight named `x.weight`; every other tensor passes through as it is."""
    fmt = format_for(quant_config)
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        module, _, part = name.rpartition(".")
        if not fmt.claims(part, tensor):
            yield name, tensor
            continue
        parts = pending.setdefault(module, {})
        parts[part] = tensor
        if fmt.ready(parts):
            yield f"{module}.weight", fmt.read(module, pending.pop(module))
    for module, parts in pending.items():
        yield f"{module}.weight", fmt.read(module, parts)


def dequantize_checkpoint(weights: Iterable[tuple[str, torch.Tensor]], quant_config: dict,
                          dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """A quantized checkpoint's tensors as dense HF-named ones, floating ones in dtype."""
    for name, value in read_quantized(weights, quant_config):
        if isinstance(value, QuantizedWeight | Fp8Weight):
            yield name, value.dequantize().to(dtype)
        else:
            yield name, value.to(dtype) if value.is_floating_point() else value
