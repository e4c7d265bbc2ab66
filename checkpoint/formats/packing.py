"""Codes packed into int32 words, the first in the low bits: GPTQ's, AWQ's and compressed-tensors' packing
for 2, 4 and 8 bits (32 / bits codes to a word, none split across words)."""

from __future__ import annotations

import torch


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
