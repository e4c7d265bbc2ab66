"""A rank's slice of a quantized weight is the same slice of its dense weight: int4 / int8 codes with their
groups, FP8 with per-tensor, per-row and block scales; what cannot be cut whole is refused by name."""

from __future__ import annotations

import pytest
import torch

from llmctl.checkpoint.formats.weights import Fp8Weight, QuantizedWeight
from llmctl.runtime.parallel_shard import columns, rows

FP8 = torch.float8_e4m3fn


def quantized(out: int, inp: int, group: int, act_order: bool = False, bits: int = 4) -> QuantizedWeight:
    g = torch.Generator().manual_seed(out + inp)
    groups = inp // group
    g_idx = torch.arange(inp, dtype=torch.int32) // group
    if act_order:
        g_idx = g_idx[torch.randperm(inp, generator=g)]
    return QuantizedWeight(torch.randint(0, 2**bits, (out, inp), generator=g, dtype=torch.int32),
                           torch.rand(out, groups, generator=g) + 0.01,
                           torch.randint(0, 2**bits, (out, groups), generator=g, dtype=torch.int32), g_idx, bits, group)


def fp8(out: int, inp: int, scales: str) -> Fp8Weight:
    g = torch.Generator().manual_seed(out * inp)
    weight = (torch.randn(out, inp, generator=g) * 50).to(FP8)
    shape = {"tensor": (1, 1), "row": (out, 1), "block": (-(-out // 128), -(-inp // 128))}[scales]
    return Fp8Weight(weight, torch.rand(*shape, generator=g) + 0.01, (128, 128) if scales == "block" else None)


@pytest.mark.parametrize("bits", [4, 8])
def test_int_weights_cut_with_their_groups(bits):
    w = quantized(96, 256, 64, bits=bits)
    dense = w.dequantize()
    got = rows(w, [(0, 32), (64, 16)], "q")
    assert torch.equal(got.dequantize(), torch.cat([dense[0:32], dense[64:80]]))
    for start, length in ((0, 128), (128, 128), (64, 64)):
        part = columns(w, (start, length), "o_proj")
        assert torch.equal(part.dequantize(), dense[:, start: start + length])
        assert part.in_order and part.scales.shape[1] == length // 64


def test_one_group_a_row_is_shared_by_every_rank():
    w = quantized(32, 256, 256)
    part = columns(w, (128, 128), "down_proj")
    assert torch.equal(part.dequantize(), w.dequantize()[:, 128:])
    assert part.group_size == 128 and part.in_order


def test_act_order_rows_split_but_columns_are_refused():
    w = quantized(64, 256, 64, act_order=True)
    assert torch.equal(rows(w, [(32, 32)], "k").dequantize(), w.dequantize()[32:])
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj: an act-order \(desc_act\) weight"):
        columns(w, (0, 128), "model.layers.0.mlp.down_proj")


def test_columns_that_split_a_group_are_refused():
    with pytest.raises(ValueError, match=r"o_proj: groups of 128 input columns do not fit this rank's columns \[64, 128\)"):
        columns(quantized(32, 256, 128), (64, 64), "o_proj")


@pytest.mark.parametrize("scales", ["tensor", "row", "block"])
def test_fp8_weights_cut_with_their_scales(scales):
    w = fp8(384, 512, scales)
    dense = w.dequantize()
    got = rows(w, [(0, 128), (256, 128)], "qkv_proj")
    assert torch.equal(got.dequantize(), torch.cat([dense[:128], dense[256:]]))
    part = columns(w, (256, 256), "o_proj")
    assert torch.equal(part.dequantize(), dense[:, 256:])


def test_fp8_blocks_that_a_rank_would_cut_are_refused():
    w = fp8(256, 256, "block")
    with pytest.raises(ValueError, match=r"gate_proj: FP8 blocks of 128 rows do not fit this rank's rows \[64, 128\)"):
        rows(w, [(64, 64)], "gate_proj")
    with pytest.raises(ValueError, match="FP8 blocks of 128 columns do not fit"):
        columns(w, (64, 192), "down_proj")
    assert torch.equal(rows(fp8(200, 256, "block"), [(128, 72)], "v").dequantize(),
                       fp8(200, 256, "block").dequantize()[128:])  # the last, partial block is whole
