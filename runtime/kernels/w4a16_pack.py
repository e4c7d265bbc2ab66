"""The one int4 layout the W4A16 kernels read, repacked once at load from GPTQ or AWQ, and its torch twin.

    qweight [K/8, N] int32   eight 4-bit codes of consecutive input channels per word, the first in the
                             low bits (GPTQ's packing: a tile of words is a coalesced row of N)
    scales  [G, N]     fp16  as the checkpoint stores them (bf16 would round them: the reference does not)
    zeros   [G, N]     uint8 the true zero point (GPTQ v1's stored-minus-one already added back)
    perm    [K] int32 | None input channel read for packed row k: act-order sorts channels by group once
                             here, and the kernel gathers x's columns in that order (exllama's trick), so
                             the group of packed row k is always k // group_size

AWQ's interleaved, N-packed words are unpacked and packed again along K; GPTQ words are kept unless
act-order asks for the permutation. `dequantize` is the reference every kernel is tested against: it
computes the same fp32 products as `llmctl.quantize.formats`, so it matches the loader's dense path bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmctl.quantize.formats import AWQ_REVERSE_ORDER, pack_int32, unpack_int32

PACK = 8  # codes per int32 word


@dataclass
class PackedW4:
    """One linear's (or several fused linears') int4 weight in the kernels' layout."""

    qweight: torch.Tensor  # [K/8, N] int32
    scales: torch.Tensor  # [G, N] fp16
    zeros: torch.Tensor  # [G, N] uint8
    perm: torch.Tensor | None  # [K] int32
    group_size: int

    def __post_init__(self) -> None:
        k8, n = self.qweight.shape
        groups = self.in_features // self.group_size
        if self.qweight.dtype != torch.int32 or self.scales.dtype != torch.float16 or self.zeros.dtype != torch.uint8:
            raise ValueError(f"packed int4 needs int32 / fp16 / uint8 tensors, got {self.qweight.dtype}, "
                             f"{self.scales.dtype}, {self.zeros.dtype}")
        if self.in_features % self.group_size or self.scales.shape != (groups, n) or self.zeros.shape != (groups, n):
            raise ValueError(f"scales and zeros must be [{groups}, {n}] for K={self.in_features} in groups of "
                             f"{self.group_size}, got {tuple(self.scales.shape)} and {tuple(self.zeros.shape)}")
        if self.perm is not None and (self.perm.shape != (self.in_features,) or self.perm.dtype != torch.int32):
            raise ValueError(f"perm must be [{self.in_features}] int32")

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * PACK

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    def nbytes(self) -> int:
        """Bytes a kernel streams for the weight (codes, scales, zeros): the bandwidth figure's numerator."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))


def from_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
              v1: bool = True) -> PackedW4:
    """GPTQ (v1 or v2) 4-bit tensors -> PackedW4; act-order g_idx becomes a channel permutation."""
    in_features, groups = qweight.shape[0] * PACK, scales.shape[0]
    if in_features % groups:
        raise ValueError(f"{groups} groups do not divide {in_features} input channels")
    group_size = in_features // groups
    zeros = (unpack_int32(qzeros, 4, dim=1) + int(v1)).to(torch.uint8)  # [G, N]
    in_order = torch.arange(in_features, device=qweight.device) // group_size
    if g_idx is None or torch.equal(g_idx.long(), in_order):
        return PackedW4(qweight.contiguous(), scales.half().contiguous(), zeros.contiguous(), None, group_size)
    perm = torch.argsort(g_idx.long(), stable=True)
    if not torch.equal(g_idx.long()[perm], in_order):
        raise ValueError(f"g_idx groups are not all {group_size} channels; the int4 kernels need equal groups")
    codes = unpack_int32(qweight, 4, dim=0)[perm]  # [K, N] in group order
    return PackedW4(pack_int32(codes, 4, dim=0), scales.half().contiguous(), zeros.contiguous(),
                    perm.to(torch.int32), group_size)


def from_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> PackedW4:
    """AWQ GEMM tensors (N-packed, interleaved) -> PackedW4 (K-packed, in order)."""
    order = list(AWQ_REVERSE_ORDER)
    codes = unpack_int32(qweight, 4, dim=1).unflatten(-1, (-1, PACK))[..., order].flatten(-2)  # [K, N]
    zeros = unpack_int32(qzeros, 4, dim=1).unflatten(-1, (-1, PACK))[..., order].flatten(-2)  # [G, N]
    in_features, groups = codes.shape[0], scales.shape[0]
    if in_features % PACK or in_features % groups:
        raise ValueError(f"AWQ weight with {in_features} input channels and {groups} groups cannot be repacked")
    return PackedW4(pack_int32(codes, 4, dim=0), scales.half().contiguous(), zeros.to(torch.uint8).contiguous(),
                    None, in_features // groups)


def concat(parts: list[PackedW4]) -> PackedW4:
    """Fuse linears that read the same input along N (q|k|v, gate|up); they must share groups and perm."""
    first = parts[0]
    for p in parts[1:]:
        same_perm = (p.perm is None and first.perm is None) or (
            p.perm is not None and first.perm is not None and torch.equal(p.perm, first.perm))
        if p.group_size != first.group_size or p.in_features != first.in_features or not same_perm:
            raise ValueError("only linears with the same input size, group size and act-order can be fused")
    return PackedW4(torch.cat([p.qweight for p in parts], 1), torch.cat([p.scales for p in parts], 1),
                    torch.cat([p.zeros for p in parts], 1), first.perm, first.group_size)


def can_concat(a: PackedW4, b: PackedW4) -> bool:
    try:
        concat([a, b])
    except ValueError:
        return False
    return True


def dequantize(w: PackedW4) -> torch.Tensor:
    """W: [N, K] float32 in the checkpoint's channel order."""
    codes = unpack_int32(w.qweight, 4, dim=0)  # [K, N]
    g = torch.arange(w.in_features, device=codes.device) // w.group_size
    dense = w.scales.float()[g] * (codes - w.zeros.long()[g]).float()  # [K, N], rows in packed order
    if w.perm is not None:
        dense = torch.empty_like(dense).index_copy_(0, w.perm.long(), dense)
    return dense.T.contiguous()


def linear_ref(x: torch.Tensor, w: PackedW4, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The torch twin of every W4A16 kernel: dequantize to x's dtype, then F.linear."""
    return F.linear(x, dequantize(w).to(x.dtype), bias)
