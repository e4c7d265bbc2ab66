"""GPTQ: AutoGPTQ's and GPTQModel's layout (`quant_method: gptq`), v1 and v2, read and written bit for bit.

    qweight [in/pf, out]     codes packed along the input dim: word (r, n) holds W[n, r*pf + j] (pf = 32/bits)
    qzeros  [groups, out/pf] zero points packed along the output dim; v1 (`checkpoint_format: gptq`, what
                             vLLM and transformers read) stores zero - 1, v2 stores them as they are
    scales  [groups, out]    fp16
    g_idx   [in]             int32 group of each input channel (act-order permutes it; old checkpoints omit it)
    bias    [out]            AutoGPTQ saves one for every quantized linear, zero unless the model had one:
                             not a part of the quantized weight, it loads as the linear's bias

2, 4 and 8 bits (3 packs across words: not read); `group_size: -1` is one group a row.
"""

from __future__ import annotations

import torch

from llmctl.checkpoint.formats.packing import pack_int32, unpack_int32
from llmctl.checkpoint.formats.weights import QuantizedWeight

PARTS = ("qweight", "qzeros", "scales", "g_idx")
BITS = (2, 4, 8)


def checkpoint_format(quant_config: dict) -> str:
    """`gptq` (v1, zeros stored minus one) or `gptq_v2`, or something unknown."""
    return quant_config.get("checkpoint_format") or quant_config.get("format") or "gptq"


class GPTQ:
    def __init__(self, quant_config: dict) -> None:
        self.bits = int(quant_config.get("bits", 4))
        fmt = checkpoint_format(quant_config)
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"unsupported GPTQ checkpoint_format {fmt!r}; llmctl reads gptq and gptq_v2")
        if self.bits not in BITS:
            raise ValueError(f"unsupported GPTQ bits {self.bits}; llmctl reads {', '.join(map(str, BITS))}")
        self.v1 = fmt == "gptq"
        self.runs_int4 = self.bits == 4

    def claims(self, part: str, tensor: torch.Tensor) -> bool:
        return part in PARTS

    def ready(self, parts: dict) -> bool:
        return all(p in parts for p in PARTS)

    def read(self, module: str, parts: dict) -> QuantizedWeight:
        missing = [p for p in PARTS[:3] if p not in parts]
        if missing:
            raise ValueError(f"quantized weight {module!r} is incomplete: found only {', '.join(sorted(parts))}")
        return read_gptq(parts["qweight"], parts["qzeros"], parts["scales"], parts.get("g_idx"), self.bits, self.v1)


def read_gptq(qweight, qzeros, scales, g_idx, bits: int, v1: bool = True) -> QuantizedWeight:
    codes = unpack_int32(qweight, bits, dim=0)  # [in, out]
    in_features, groups = codes.shape[0], scales.shape[0]
    if in_features % groups:
        raise ValueError(f"{groups} groups do not divide {in_features} input channels")
    group_size = in_features // groups
    # v1 adds the 1 back without masking, as exllama and vLLM do (a stored 15 means a zero point of 16).
    zeros = unpack_int32(qzeros, bits, dim=1) + int(v1)  # [groups, out]
    if g_idx is None:  # early checkpoints without act-order: groups follow channel order
        g_idx = torch.arange(in_features, device=codes.device) // group_size
    return QuantizedWeight(codes.T.int(), scales.T.float(), zeros.T.int(), g_idx.int(), bits, group_size)


def dequantize_gptq(qweight, qzeros, scales, g_idx, bits: int, v1: bool = True) -> torch.Tensor:
    """GPTQ tensors -> W: [out, in] float32."""
    return read_gptq(qweight, qzeros, scales, g_idx, bits, v1).dequantize()


def gptq_tensors(w: QuantizedWeight) -> dict[str, torch.Tensor]:
    """One linear's GPTQ v1 tensors, keyed by suffix (`qweight`, ...)."""
    if not bool((w.zeros >= 1).all()):
        raise ValueError("GPTQ v1 cannot store a zero point of 0 (it keeps zero - 1); fit with min_zero=1")
    return {
        "qweight": pack_int32(w.qweight.T, w.bits, dim=0),  # [in/pf, out]
        "qzeros": pack_int32(w.zeros.T - 1, w.bits, dim=1),  # [groups, out/pf]
        "scales": w.scales.T.contiguous().half(),  # [groups, out]
        "g_idx": w.g_idx.to(torch.int32, copy=True),  # [in]; a copy: q, k and v share one g_idx in memory
    }


def gptq_config(bits: int, group_size: int, sym: bool, desc_act: bool, static_groups: bool,
                damp_percent: float, true_sequential: bool) -> dict:
    """`quantization_config` as AutoGPTQ / GPTQModel write it (also `quantize_config.json`)."""
    from llmctl import __version__

    return {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": bits, "group_size": group_size,
            "desc_act": desc_act, "sym": sym, "static_groups": static_groups, "damp_percent": damp_percent,
            "true_sequential": true_sequential, "lm_head": False, "model_name_or_path": None,
            "model_file_base_name": "model", "meta": {"quantizer": [f"llmctl:{__version__}"]}}
