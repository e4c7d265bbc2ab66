"""AWQ GEMM: AutoAWQ's layout (`quant_method: awq`, `version: gemm`), read and written bit for bit.

    qweight [in, out/8]      codes packed along the output dim, interleaved: word (k, c) holds
                             W[c*8 + AWQ_ORDER[j], k] in slot j (the order its CUDA kernel dequantizes in)
    qzeros  [groups, out/8]  zero points as they are, same interleave
    scales  [groups, out]    fp16
"""

from __future__ import annotations

import torch

from llmctl.checkpoint.formats.packing import pack_int32, unpack_int32
from llmctl.checkpoint.formats.weights import QuantizedWeight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # AWQ_ORDER's inverse: column i sits in slot AWQ_REVERSE_ORDER[i]
PARTS = ("qweight", "qzeros", "scales")


def _interleave(x: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    # x: [rows, out] -> the same, each run of 8 columns reordered
    return x.unflatten(-1, (-1, len(order)))[..., list(order)].flatten(-2)


class AWQ:
    runs_int4 = True

    def __init__(self, quant_config: dict) -> None:
        version = str(quant_config.get("version", "gemm")).lower()
        bits = int(quant_config.get("bits", quant_config.get("w_bit", 4)))
        if version != "gemm" or bits != 4:
            raise ValueError(f"unsupported AWQ checkpoint (version {version!r}, {bits} bits); llmctl reads 4-bit gemm")

    def claims(self, part: str, tensor: torch.Tensor) -> bool:
        return part in PARTS

    def ready(self, parts: dict) -> bool:
        return all(p in parts for p in PARTS)

    def read(self, module: str, parts: dict) -> QuantizedWeight:
        if not self.ready(parts):
            raise ValueError(f"quantized weight {module!r} is incomplete: found only {', '.join(sorted(parts))}")
        return read_awq(parts["qweight"], parts["qzeros"], parts["scales"])


def read_awq(qweight, qzeros, scales) -> QuantizedWeight:
    codes = _interleave(unpack_int32(qweight, 4, dim=1), AWQ_REVERSE_ORDER)  # [in, out]
    zeros = _interleave(unpack_int32(qzeros, 4, dim=1), AWQ_REVERSE_ORDER)  # [groups, out]
    in_features, groups = codes.shape[0], scales.shape[0]
    if in_features % groups:
        raise ValueError(f"AWQ weight with {in_features} input channels and {groups} groups cannot be read")
    group_size = in_features // groups
    g_idx = torch.arange(in_features, device=codes.device, dtype=torch.int32) // group_size
    return QuantizedWeight(codes.T.int(), scales.T.float(), zeros.T.int(), g_idx, 4, group_size)


def dequantize_awq(qweight, qzeros, scales) -> torch.Tensor:
    """AWQ GEMM tensors -> W: [out, in] float32."""
    return read_awq(qweight, qzeros, scales).dequantize()


def awq_tensors(w: QuantizedWeight) -> dict[str, torch.Tensor]:
    """One linear's AWQ GEMM tensors; AWQ has no act-order, so groups must follow channel order."""
    if w.bits != 4:
        raise ValueError(f"AWQ GEMM checkpoints are 4-bit, got {w.bits}")
    if not w.in_order:
        raise ValueError("AWQ GEMM checkpoints cannot store act-order (desc_act) groups")
    return {
        "qweight": pack_int32(_interleave(w.qweight.T, AWQ_ORDER), 4, dim=1),  # [in, out/8]
        "qzeros": pack_int32(_interleave(w.zeros.T, AWQ_ORDER), 4, dim=1),  # [groups, out/8]
        "scales": w.scales.T.contiguous().half(),  # [groups, out]
    }


def awq_config(bits: int, group_size: int) -> dict:
    """`quantization_config` as AutoAWQ writes it; GEMM kernels always apply zero points."""
    return {"quant_method": "awq", "version": "gemm", "bits": bits, "group_size": group_size,
            "zero_point": True, "modules_to_not_convert": None}
