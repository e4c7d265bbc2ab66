"""The layout-neutral weights every format reads into and writes from, and the runtime consumes.

`QuantizedWeight`: integer codes on a grid (GPTQ, AWQ, compressed-tensors int). `Fp8Weight`: float8 values
with scales per tensor, channel or block (compressed-tensors float, `quant_method: fp8`). Each knows its
dense value, computed as the library that wrote the format computes it, so that a loader's logits equal
the library's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# A decoder layer's projections, as the runtime's fused layers take them: a checkpoint that leaves one of
# them dense (an ignore list) runs every projection dense, since a fused int4 or FP8 layer takes one kind.
PROJECTIONS = tuple(f"model.layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                   "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                   "mlp.down_proj"))


@dataclass
class QuantizedWeight:
    """One linear's integer-quantized weight: W[o, i] = scales[o, g] * (qweight[o, i] - zeros[o, g]), g = g_idx[i]."""

    qweight: torch.Tensor  # [out, in] int32 in [0, 2^bits - 1]
    scales: torch.Tensor  # [out, num_groups] float32 (values of the checkpoint's scale dtype)
    zeros: torch.Tensor  # [out, num_groups] int32 (a symmetric grid: 2^(bits - 1))
    g_idx: torch.Tensor  # [in] int32: the group of each input channel
    bits: int
    group_size: int  # channels per group (in_features for one group a row)
    # The dtype the writing library rounds each dequantized weight to (compressed-tensors computes in its
    # scales' dtype); None: the exact fp32 product (GPTQ, AWQ, and the runtime's int4 kernels).
    rounding: torch.dtype | None = None

    def dequantize(self) -> torch.Tensor:
        """W': [out, in] float32."""
        g = self.g_idx.long()
        dense = self.scales[:, g] * (self.qweight - self.zeros[:, g]).float()
        return dense if self.rounding is None else dense.to(self.rounding).float()

    def split_rows(self, sizes: list[int]) -> list[QuantizedWeight]:
        """Output rows cut into consecutive parts (q, k, v quantized as one matrix, then saved apart)."""
        parts = zip(self.qweight.split(sizes), self.scales.split(sizes), self.zeros.split(sizes))
        return [QuantizedWeight(q, s, z, self.g_idx, self.bits, self.group_size, self.rounding) for q, s, z in parts]

    @property
    def in_order(self) -> bool:
        """Whether groups follow channel order (no act-order permutation)."""
        expected = torch.arange(self.g_idx.numel(), device=self.g_idx.device) // self.group_size
        return bool(torch.equal(self.g_idx.long(), expected))


@dataclass
class Fp8Weight:
    """One linear's float8 (e4m3) weight and its scales: W = weight * scale, broadcast per tensor ([1, 1]),
    per output channel ([out, 1]) or per block ([out / block[0], in / block[1]])."""

    weight: torch.Tensor  # [out, in] torch.float8_e4m3fn
    scale: torch.Tensor  # float32, one of the three shapes above
    block: tuple[int, int] | None = None  # (rows, columns) of a block, for block-wise scales
    input_scale: torch.Tensor | None = None  # a static activation scale (scalar); None: dynamic or none
    rounding: torch.dtype | None = None  # as QuantizedWeight's: compressed-tensors rounds to its scale's dtype

    def dense_scale(self) -> torch.Tensor:
        """The scale of every weight element: [out, in] float32 (or broadcastable to it)."""
        if self.block is None:
            return self.scale
        rows, cols = self.block
        out, inp = self.weight.shape
        return self.scale.repeat_interleave(rows, 0)[:out].repeat_interleave(cols, 1)[:, :inp]

    def dequantize(self) -> torch.Tensor:
        """W': [out, in] float32."""
        dense = self.weight.float() * self.dense_scale()
        return dense if self.rounding is None else dense.to(self.rounding).float()
