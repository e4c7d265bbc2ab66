"""The two community 4-bit checkpoint layouts, packed and unpacked bit for bit.

Both store int32 words that hold 32/bits codes, code j in bits [bits*j, bits*(j+1)):

GPTQ v1 (AutoGPTQ, GPTQModel `checkpoint_format: gptq`, what vLLM and transformers read):
    qweight [in/pf, out]     codes packed along the input dim: word (r, n) holds W[n, r*pf + j]
    qzeros  [groups, out/pf] zero - 1, packed along the output dim (v2 checkpoints drop the - 1)
    scales  [groups, out]    fp16
    g_idx   [in]             int32 group of each input channel (act-order permutes it)

AWQ GEMM (AutoAWQ `version: gemm`):
    qweight [in, out/pf]     codes packed along the output dim, interleaved: word (k, c) holds
                             W[c*pf + AWQ_ORDER[j], k] in slot j (the order its CUDA kernel dequantizes in)
    qzeros  [groups, out/pf] zeros as they are, same interleave
    scales  [groups, out]    fp16
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # AWQ_ORDER's inverse: column i sits in slot AWQ_REVERSE_ORDER[i]
QUANT_PARTS = ("qweight", "qzeros", "scales", "g_idx")


@dataclass
class QuantizedWeight:
    """One linear's quantized weight, layout-neutral: what the quantizers produce and the writers below pack."""

    qweight: torch.Tensor  # [out, in] int32 in [0, 2^bits - 1]
    scales: torch.Tensor  # [out, num_groups] float32 (fp16-representable)
    zeros: torch.Tensor  # [out, num_groups] int32
    g_idx: torch.Tensor  # [in] int32: the group of each input channel
    bits: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        """W': [out, in] float32."""
        g = self.g_idx.long()
        return self.scales[:, g] * (self.qweight - self.zeros[:, g]).float()

    def split_rows(self, sizes: list[int]) -> list[QuantizedWeight]:
        """Output rows cut into consecutive parts (q, k, v quantized as one matrix, then saved apart)."""
        parts = zip(self.qweight.split(sizes), self.scales.split(sizes), self.zeros.split(sizes))
        return [QuantizedWeight(q, s, z, self.g_idx, self.bits, self.group_size) for q, s, z in parts]


def pack_int32(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack 32/bits consecutive codes along `dim` into one int32 word, the first in the low bits."""
    pf = 32 // bits
    codes = codes.movedim(dim, -1).long()  # [..., n]
    if codes.shape[-1] % pf:
        raise ValueError(f"cannot pack {codes.shape[-1]} codes into words of {pf}")
    shifts = torch.arange(pf, device=codes.device) * bits
    words = (codes.unflatten(-1, (-1, pf)) << shifts).sum(-1)  # [..., n/pf] in [0, 2^32)
    words = torch.where(words >= 2**31, words - 2**32, words)  # the same bits, as a signed int32
    return words.int().movedim(-1, dim).contiguous()


def unpack_int32(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The inverse of pack_int32: int64 codes, `32/bits` times longer along `dim`."""
    shifts = torch.arange(32 // bits, device=words.device) * bits
    codes = ((words.movedim(dim, -1).long() & 0xFFFFFFFF).unsqueeze(-1) >> shifts) & (2**bits - 1)
    return codes.flatten(-2).movedim(-1, dim)


def _awq_interleave(x: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    # x: [rows, out] -> the same, each run of 8 columns reordered
    return x.unflatten(-1, (-1, len(order)))[..., list(order)].flatten(-2)


# -- writing --------------------------------------------------------------------------------------

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


def awq_tensors(w: QuantizedWeight) -> dict[str, torch.Tensor]:
    """One linear's AWQ GEMM tensors; AWQ has no act-order, so groups must follow channel order."""
    if w.bits != 4:
        raise ValueError(f"AWQ GEMM checkpoints are 4-bit, got {w.bits}")
    in_features = w.qweight.shape[1]
    if not torch.equal(w.g_idx.long().cpu(), torch.arange(in_features) // w.group_size):
        raise ValueError("AWQ GEMM checkpoints cannot store act-order (desc_act) groups")
    return {
        "qweight": pack_int32(_awq_interleave(w.qweight.T, AWQ_ORDER), 4, dim=1),  # [in, out/8]
        "qzeros": pack_int32(_awq_interleave(w.zeros.T, AWQ_ORDER), 4, dim=1),  # [groups, out/8]
        "scales": w.scales.T.contiguous().half(),  # [groups, out]
    }


def gptq_config(bits: int, group_size: int, sym: bool, desc_act: bool, static_groups: bool,
                damp_percent: float, true_sequential: bool) -> dict:
    """`quantization_config` as AutoGPTQ / GPTQModel write it (also `quantize_config.json`)."""
    from llmctl import __version__

    return {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": bits, "group_size": group_size,
            "desc_act": desc_act, "sym": sym, "static_groups": static_groups, "damp_percent": damp_percent,
            "true_sequential": true_sequential, "lm_head": False, "model_name_or_path": None,
            "model_file_base_name": "model", "meta": {"quantizer": [f"llmctl:{__version__}"]}}


def awq_config(bits: int, group_size: int) -> dict:
    """`quantization_config` as AutoAWQ writes it; GEMM kernels always apply zero points."""
    return {"quant_method": "awq", "version": "gemm", "bits": bits, "group_size": group_size,
            "zero_point": True, "modules_to_not_convert": None}


# -- reading --------------------------------------------------------------------------------------

def dequantize_gptq(qweight, qzeros, scales, g_idx, bits: int, v1: bool = True) -> torch.Tensor:
    """GPTQ tensors -> W: [out, in] float32. v1 adds the 1 back without masking, as exllama and vLLM do."""
    codes = unpack_int32(qweight, bits, dim=0)  # [in, out]
    zeros = unpack_int32(qzeros, bits, dim=1) + int(v1)  # [groups, out]
    g = g_idx.long()
    return (scales.float()[g] * (codes - zeros[g]).float()).T.contiguous()


def dequantize_awq(qweight, qzeros, scales, bits: int = 4) -> torch.Tensor:
    """AWQ GEMM tensors -> W: [out, in] float32."""
    codes = _awq_interleave(unpack_int32(qweight, bits, dim=1), AWQ_REVERSE_ORDER)  # [in, out]
    zeros = _awq_interleave(unpack_int32(qzeros, bits, dim=1), AWQ_REVERSE_ORDER)  # [groups, out]
    group_size = codes.shape[0] // scales.shape[0]
    w = (codes - zeros.repeat_interleave(group_size, 0)).float() * scales.float().repeat_interleave(group_size, 0)
    return w.T.contiguous()


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


def gptq_format(quant_config: dict) -> str:
    """A GPTQ checkpoint's format: `gptq` (v1, zeros stored minus one) or `gptq_v2`, or something unknown."""
    return quant_config.get("checkpoint_format") or quant_config.get("format") or "gptq"


def is_int4(quant_config: dict | None) -> bool:
    """Whether a checkpoint is one of the 4-bit layouts the runtime repacks for its int4 kernels:
    GPTQ (v1 or v2) and AWQ GEMM."""
    if not quant_config or int(quant_config.get("bits", 4)) != 4:
        return False
    method = quant_config.get("quant_method")
    if method == "awq":
        return str(quant_config.get("version", "gemm")).lower() == "gemm"
    return method == "gptq" and gptq_format(quant_config) in ("gptq", "gptq_v2")


def _reader(quant_config: dict):
    """The function that turns one module's parts into its dense weight, and the parts it needs."""
    method = quant_config.get("quant_method")
    bits = int(quant_config.get("bits", 4))
    if method == "gptq":
        fmt = gptq_format(quant_config)
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"unsupported GPTQ checkpoint_format {fmt!r}; llmctl reads gptq and gptq_v2")
        v1 = fmt == "gptq"
        return (lambda p: dequantize_gptq(p["qweight"], p["qzeros"], p["scales"], p["g_idx"], bits, v1)), QUANT_PARTS
    if method == "awq":
        version = str(quant_config.get("version", "gemm")).lower()
        if version != "gemm" or bits != 4:
            raise ValueError(f"unsupported AWQ checkpoint (version {version!r}, {bits} bits); llmctl reads 4-bit gemm")
        return (lambda p: dequantize_awq(p["qweight"], p["qzeros"], p["scales"])), QUANT_PARTS[:3]
    raise ValueError(f"unsupported quant_method {method!r}; llmctl loads gptq and awq checkpoints")


def dequantize_checkpoint(weights: Iterable[tuple[str, torch.Tensor]], quant_config: dict,
                          dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """A quantized checkpoint's tensors as dense HF-named ones: `x.qweight` & co. become `x.weight`.

    Dense tensors pass through (floating ones cast to dtype). A module's parts may come in any order
    and from different shards, so each is held until its module is complete.
    """
    dequantize, needed = _reader(quant_config)
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        prefix, _, part = name.rpartition(".")
        if part not in QUANT_PARTS:
            yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor
            continue
        parts = pending.setdefault(prefix, {})
        parts[part] = tensor
        if all(p in parts for p in needed):
            yield f"{prefix}.weight", dequantize(pending.pop(prefix)).to(dtype)
    for prefix, parts in pending.items():
        if "g_idx" not in parts and all(p in parts for p in needed[:3]):
            # Early GPTQ checkpoints without act-order leave g_idx out: groups follow channel order.
            in_features, groups = parts["qweight"].shape[0] * 32 // int(quant_config.get("bits", 4)), parts["scales"].shape[0]
            parts["g_idx"] = torch.arange(in_features, dtype=torch.int32) // (in_features // groups)
            yield f"{prefix}.weight", dequantize(parts).to(dtype)
        else:
            raise ValueError(f"quantized weight {prefix!r} is incomplete: found only {', '.join(sorted(parts))}")
