"""The one int4 layout the W4A16 kernels read, repacked once at load from GPTQ or AWQ, and its torch twin.

    qweight [K/8, N] int32   eight 4-bit codes per word, the first in the low bits; a tile of words is a
                             coalesced row of N. Interleaved (K and the group size multiples of 32): word
                             4i + c of a 32-channel chunk holds channels 2c + 8j + p of the chunk at nibble
                             j + 4p, so the pair LOP3 frees from nibbles (j, j + 4) is two adjacent
                             channels, and the words a thread loads are, unpacked, exactly the register
                             operand of a tensor-core MMA (Marlin's trick). Else GPTQ's order: nibble j of
                             word r is channel 8r + j (only the dequantize + cuBLAS path reads those).
    scales  [G, N]     fp16  as the checkpoint stores them (bf16 would round them: the reference does not)
    zeros   [G, N]     uint8 the true zero point (GPTQ v1's stored-minus-one already added back)
    perm    [K] int32 | None input channel read for packed row k: act-order sorts channels by group once
                             here, and the kernel gathers x's columns in that order (exllama's trick), so
                             the group of packed row k is always k // group_size

AWQ's interleaved, N-packed words are unpacked and packed again along K; GPTQ words are repacked in
the interleaved order (once, at load). `dequantize` is the reference every kernel is tested against: it
computes the same fp32 products as `llmctl.checkpoint.formats`, so it matches the loader's dense path bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmctl.checkpoint.formats.awq import read_awq
from llmctl.checkpoint.formats.gptq import read_gptq
from llmctl.checkpoint.formats.packing import pack_int32, unpack_int32
from llmctl.checkpoint.formats.weights import QuantizedWeight

PACK = 8  # codes per int32 word
CHUNK = 32  # channels an interleaved word's codes span


def interleaved_rows(k: int, device=None) -> torch.Tensor:
    """The channel (row of a [K, N] code matrix) that packed nibble i holds, i = 8 * word + nibble."""
    i = torch.arange(k, device=device)
    word, j = i // PACK, i % PACK
    return CHUNK * (word // 4) + 2 * (word % 4) + 8 * (j % 4) + j // 4


def can_interleave(in_features: int, group_size: int) -> bool:
    return in_features % CHUNK == 0 and group_size % CHUNK == 0


@dataclass
class PackedW4:
    """One linear's (or several fused linears') int4 weight in the kernels' layout."""

    qweight: torch.Tensor  # [K/8, N] int32
    scales: torch.Tensor  # [G, N] fp16
    zeros: torch.Tensor  # [G, N] uint8
    perm: torch.Tensor | None  # [K] int32
    group_size: int
    interleaved: bool  # always can_interleave(K, group_size): one packing per shape

    def __post_init__(self) -> None:
        k8, n = self.qweight.shape
        groups = self.in_features // self.group_size
        if self.qweight.dtype != torch.int32 or self.scales.dtype != torch.float16 or self.zeros.dtype != torch.uint8:
            raise ValueError(f"packed int4 needs int32 / fp16 / uint8 tensors, got {self.qweight.dtype}, "
                             f"{self.scales.dtype}, {self.zeros.dtype}")
        if self.in_features % self.group_size or self.scales.shape != (groups, n) or self.zeros.shape != (groups, n):
            raise ValueError(f"scales and zeros must be [{groups}, {n}] for K={self.in_features} in groups of "
                             f"{self.group_size}, got {tuple(self.scales.shape)} and {tuple(self.zeros.shape)}")
        if self.interleaved != can_interleave(self.in_features, self.group_size):
            raise ValueError(f"K={self.in_features} with groups of {self.group_size} is packed "
                             f"{'interleaved' if can_interleave(self.in_features, self.group_size) else 'in GPTQ order'}"
                             f" (interleaved exactly when both are multiples of {CHUNK}), got interleaved={self.interleaved}")
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


def pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, perm: torch.Tensor | None,
         group_size: int) -> PackedW4:
    """codes [K, N] (rows in packed order: act-order's group order), interleaved where K and groups allow."""
    interleave = can_interleave(codes.shape[0], group_size)
    if interleave:
        codes = codes[interleaved_rows(codes.shape[0], codes.device)]
    return PackedW4(pack_int32(codes, 4, dim=0), scales.half().contiguous(), zeros.to(torch.uint8).contiguous(),
                    perm, group_size, interleave)


def unpacked_codes(w: PackedW4) -> torch.Tensor:
    """[K, N] int32 codes, row k for packed row k (the checkpoint's channel order unless act-order)."""
    packed = unpack_int32(w.qweight, 4, dim=0)
    if not w.interleaved:
        return packed
    return torch.empty_like(packed).index_copy_(0, interleaved_rows(w.in_features, packed.device), packed)


def from_quantized(w: QuantizedWeight) -> PackedW4:
    """A 4-bit layout-neutral weight (any format's) -> PackedW4; act-order g_idx becomes a channel permutation.
    Scales become fp16 (exact for GPTQ's and AWQ's; bf16 scales of a compressed-tensors checkpoint round
    only where they fall below fp16's normal range)."""
    if w.bits != 4:
        raise ValueError(f"the int4 kernels take 4-bit weights, got {w.bits}")
    rows, scales, zeros = w.qweight.T, w.scales.T, w.zeros.T.to(torch.uint8)  # [K, N], [G, N], [G, N]
    if w.in_order:
        return pack(rows, scales, zeros, None, w.group_size)
    g_idx = w.g_idx.long()
    perm = torch.argsort(g_idx, stable=True)
    in_order = torch.arange(g_idx.numel(), device=g_idx.device) // w.group_size
    if not torch.equal(g_idx[perm], in_order):
        raise ValueError(f"g_idx groups are not all {w.group_size} channels; the int4 kernels need equal groups")
    return pack(rows[perm], scales, zeros, perm.to(torch.int32), w.group_size)  # rows in group order


def from_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
              v1: bool = True) -> PackedW4:
    """GPTQ (v1 or v2) 4-bit tensors -> PackedW4."""
    return from_quantized(read_gptq(qweight, qzeros, scales, g_idx, 4, v1))


def from_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> PackedW4:
    """AWQ GEMM tensors (N-packed, AWQ's nibble order) -> PackedW4 (K-packed, interleaved where allowed)."""
    return from_quantized(read_awq(qweight, qzeros, scales))


def concat(parts: list[PackedW4]) -> PackedW4:
    """Fuse linears that read the same input along N (q|k|v, gate|up); they must share groups and perm."""
    first = parts[0]
    for p in parts[1:]:
        same_perm = (p.perm is None and first.perm is None) or (
            p.perm is not None and first.perm is not None and torch.equal(p.perm, first.perm))
        if (p.group_size != first.group_size or p.in_features != first.in_features or not same_perm
                or p.interleaved != first.interleaved):
            raise ValueError("only linears with the same input size, group size and act-order can be fused")
    return PackedW4(torch.cat([p.qweight for p in parts], 1), torch.cat([p.scales for p in parts], 1),
                    torch.cat([p.zeros for p in parts], 1), first.perm, first.group_size, first.interleaved)


def can_concat(a: PackedW4, b: PackedW4) -> bool:
    try:
        concat([a, b])
    except ValueError:
        return False
    return True


def dequantize(w: PackedW4) -> torch.Tensor:
    """W: [N, K] float32 in the checkpoint's channel order."""
    g = torch.arange(w.in_features, device=w.qweight.device) // w.group_size
    dense = w.scales.float()[g] * (unpacked_codes(w) - w.zeros.long()[g]).float()  # [K, N], rows in packed order
    if w.perm is not None:
        dense = torch.empty_like(dense).index_copy_(0, w.perm.long(), dense)
    return dense.T.contiguous()


def linear_ref(x: torch.Tensor, w: PackedW4, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The torch twin of every W4A16 kernel: dequantize to x's dtype, then F.linear."""
    return F.linear(x, dequantize(w).to(x.dtype), bias)
