"""GPTQ v1 and AWQ GEMM bit layouts: hand-checked words, the peers' published packing loops, round trips."""

from __future__ import annotations

import pytest
import torch

from llmctl.checkpoint.formats import dequantize_checkpoint
from llmctl.checkpoint.formats.awq import AWQ_ORDER, awq_tensors, dequantize_awq
from llmctl.checkpoint.formats.gptq import dequantize_gptq, gptq_tensors
from llmctl.checkpoint.formats.packing import pack_int32, unpack_int32
from llmctl.checkpoint.formats.weights import QuantizedWeight


def random_weight(out=16, inp=64, group_size=16, bits=4, act_order=False, seed=0, min_zero=1) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    groups = inp // group_size
    g_idx = torch.arange(inp) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(inp, generator=g)]
    return QuantizedWeight(
        qweight=torch.randint(0, maxq + 1, (out, inp), generator=g, dtype=torch.int32),
        scales=torch.rand(out, groups, generator=g).add(0.01).half().float(),
        zeros=torch.randint(min_zero, maxq + 1, (out, groups), generator=g, dtype=torch.int32),
        g_idx=g_idx.int(), bits=bits, group_size=group_size)


# -- hand-checked words -----------------------------------------------------------------------------

def words(t: torch.Tensor) -> list[str]:
    return [f"{v & 0xFFFFFFFF:#010x}" for v in t.flatten().tolist()]


def test_pack_puts_the_first_code_in_the_low_bits():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    assert words(pack_int32(codes, 4, dim=1)) == ["0x87654321"]
    assert words(pack_int32(codes.T, 4, dim=0)) == ["0x87654321"]
    assert pack_int32(codes, 4, dim=1).dtype == torch.int32
    assert pack_int32(torch.tensor([[1, 2, 3, 255]]), 8, dim=1).tolist() == [[0xFF030201 - 2**32]]  # signed int32
    assert pack_int32(torch.tensor([[3] * 16]), 2, dim=1).tolist() == [[-1]]


def test_unpack_reads_signed_words_back():
    words = torch.tensor([[0x87654321 - 2**32, 0x0000000F]], dtype=torch.int32)
    assert unpack_int32(words, 4, dim=1).tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 15, 0, 0, 0, 0, 0, 0, 0]]


def test_gptq_layout_by_hand():
    # 8 outputs x 8 inputs, one group: W[n, k] has code (k + n) % 16 and output n has zero point n + 1.
    codes = (torch.arange(8)[None, :] + torch.arange(8)[:, None]) % 16
    w = QuantizedWeight(codes.int(), torch.ones(8, 1), (torch.arange(8) + 1).int()[:, None],
                        torch.zeros(8, dtype=torch.int32), 4, 8)
    t = gptq_tensors(w)
    # qweight [in/8, out]: column n packs inputs 0..7 of output n, input 0 in the low bits.
    assert t["qweight"].shape == (1, 8)
    assert words(t["qweight"])[:3] == ["0x76543210", "0x87654321", "0x98765432"]
    # qzeros [groups, out/8]: outputs packed along the word, each stored as zero - 1.
    assert t["qzeros"].shape == (1, 1) and words(t["qzeros"]) == ["0x76543210"]
    assert t["scales"].shape == (1, 8) and t["scales"].dtype == torch.float16 and t["g_idx"].dtype == torch.int32


def test_awq_layout_by_hand():
    # One input row, output n holds code n: the word stores outputs in the order 0 2 4 6 1 3 5 7.
    w = QuantizedWeight(torch.arange(8).int()[:, None], torch.ones(8, 1), torch.arange(8).int()[:, None],
                        torch.zeros(1, dtype=torch.int32), 4, 1)
    t = awq_tensors(w)
    assert t["qweight"].shape == (1, 1)  # [in, out/8]
    assert words(t["qweight"]) == ["0x75316420"]
    assert words(t["qzeros"]) == ["0x75316420"]  # zeros as they are, same interleave
    assert AWQ_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)


# -- the peers' published packing loops, transcribed as oracles --------------------------------------

def autogptq_pack(w: QuantizedWeight):
    """AutoGPTQ / GPTQModel `pack_original`: intweight [in, out], rows of 32/bits packed into a word."""
    pf = 32 // w.bits
    intweight = w.qweight.T.long()
    qweight = torch.zeros(intweight.shape[0] // pf, intweight.shape[1], dtype=torch.int64)
    for row in range(qweight.shape[0]):
        for j in range(pf):
            qweight[row] |= intweight[row * pf + j] << (w.bits * j)
    zeros = (w.zeros.T - 1).long()
    qzeros = torch.zeros(zeros.shape[0], zeros.shape[1] // pf, dtype=torch.int64)
    for col in range(qzeros.shape[1]):
        for j in range(pf):
            qzeros[:, col] |= zeros[:, col * pf + j] << (w.bits * j)
    return qweight, qzeros


def autoawq_pack(w: QuantizedWeight):
    """AutoAWQ `WQLinear_GEMM.from_linear`: intweight [in, out], order_map within each word."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    intweight, zeros = w.qweight.T.long(), w.zeros.T.long()
    qweight = torch.zeros(intweight.shape[0], intweight.shape[1] // 8, dtype=torch.int64)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            qweight[:, col] |= intweight[:, col * 8 + order_map[i]] << (i * 4)
    qzeros = torch.zeros(zeros.shape[0], zeros.shape[1] // 8, dtype=torch.int64)
    for col in range(zeros.shape[1] // 8):
        for i in range(8):
            qzeros[:, col] |= zeros[:, col * 8 + order_map[i]] << (i * 4)
    return qweight, qzeros


def autoawq_dequantize(qweight, qzeros, scales, group_size):
    """AutoAWQ `dequantize_gemm` (packing_utils.py) -> [in, out]."""
    shifts = torch.arange(0, 32, 4)
    iw = torch.bitwise_right_shift(qweight[:, :, None], shifts[None, None, :]).view(qweight.shape[0], -1)
    iz = torch.bitwise_right_shift(qzeros[:, :, None], shifts[None, None, :]).view(qzeros.shape[0], -1)
    reverse = torch.arange(iw.shape[-1]).view(-1, 8)[:, [0, 4, 1, 5, 2, 6, 3, 7]].view(-1)
    iw, iz = iw[:, reverse] & 15, iz[:, reverse] & 15
    return (iw - iz.repeat_interleave(group_size, 0)) * scales.float().repeat_interleave(group_size, 0)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gptq_matches_autogptq_packing(bits):
    w = random_weight(out=32, inp=64, group_size=16, bits=bits, act_order=True)
    qweight, qzeros = autogptq_pack(w)
    t = gptq_tensors(w)
    assert torch.equal(t["qweight"].long() & 0xFFFFFFFF, qweight)
    assert torch.equal(t["qzeros"].long() & 0xFFFFFFFF, qzeros)


def test_awq_matches_autoawq_packing_and_dequantization():
    w = random_weight(out=32, inp=64, group_size=16, min_zero=0)
    qweight, qzeros = autoawq_pack(w)
    t = awq_tensors(w)
    assert torch.equal(t["qweight"].long() & 0xFFFFFFFF, qweight)
    assert torch.equal(t["qzeros"].long() & 0xFFFFFFFF, qzeros)
    ours = dequantize_awq(t["qweight"], t["qzeros"], t["scales"])
    torch.testing.assert_close(ours, autoawq_dequantize(t["qweight"], t["qzeros"], t["scales"], 16).T, rtol=0, atol=0)


# -- round trips -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,act_order", [(4, False), (4, True), (2, False), (8, True)])
def test_gptq_round_trip_is_exact(bits, act_order):
    w = random_weight(bits=bits, act_order=act_order)
    t = gptq_tensors(w)
    assert t["qweight"].shape == (64 * bits // 32, 16) and t["qzeros"].shape == (4, 16 * bits // 32)
    dense = dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits)
    assert torch.equal(dense, w.dequantize())


def test_awq_round_trip_is_exact():
    w = random_weight(min_zero=0)
    t = awq_tensors(w)
    assert t["qweight"].shape == (64, 2) and t["qzeros"].shape == (4, 2) and t["scales"].shape == (4, 16)
    assert torch.equal(dequantize_awq(t["qweight"], t["qzeros"], t["scales"]), w.dequantize())


def test_formats_refuse_what_they_cannot_store():
    with pytest.raises(ValueError, match="zero point of 0"):
        gptq_tensors(random_weight(min_zero=0, seed=3))
    with pytest.raises(ValueError, match="act-order"):
        awq_tensors(random_weight(act_order=True))
    with pytest.raises(ValueError, match="4-bit"):
        awq_tensors(random_weight(bits=8))


# -- dequantize_checkpoint ---------------------------------------------------------------------------

def test_dequantize_checkpoint_reassembles_modules_from_any_order():
    a, b = random_weight(seed=1), random_weight(seed=2, act_order=True)
    tensors = [(f"m.a.{k}", v) for k, v in gptq_tensors(a).items()]
    tensors += [(f"m.b.{k}", v) for k, v in gptq_tensors(b).items()]
    tensors = tensors[::-1] + [("m.norm.weight", torch.ones(4, dtype=torch.float16)), ("m.a.bias", torch.ones(16))]
    out = dict(dequantize_checkpoint(tensors, {"quant_method": "gptq", "bits": 4}, torch.float32))
    assert set(out) == {"m.a.weight", "m.b.weight", "m.norm.weight", "m.a.bias"}
    assert torch.equal(out["m.a.weight"], a.dequantize()) and torch.equal(out["m.b.weight"], b.dequantize())
    assert out["m.norm.weight"].dtype == torch.float32


def test_dequantize_checkpoint_handles_v2_awq_and_missing_g_idx():
    w = random_weight(seed=4)
    t = gptq_tensors(w)
    v2 = dict(t, qzeros=pack_int32(w.zeros.T, 4, dim=1))  # gptq_v2: zeros stored as they are
    v2 = [(f"x.{k}", v) for k, v in v2.items()]
    out = dict(dequantize_checkpoint(v2, {"quant_method": "gptq", "checkpoint_format": "gptq_v2"}, torch.float32))
    assert torch.equal(out["x.weight"], w.dequantize())
    no_g_idx = [(f"x.{k}", v) for k, v in t.items() if k != "g_idx"]
    out = dict(dequantize_checkpoint(no_g_idx, {"quant_method": "gptq", "bits": 4}, torch.float32))
    assert torch.equal(out["x.weight"], w.dequantize())
    aw = random_weight(min_zero=0, seed=5)
    out = dict(dequantize_checkpoint([(f"x.{k}", v) for k, v in awq_tensors(aw).items()],
                                     {"quant_method": "awq", "version": "gemm", "bits": 4}, torch.float16))
    assert torch.equal(out["x.weight"], aw.dequantize().half())


def test_dequantize_checkpoint_errors_name_the_problem():
    t = gptq_tensors(random_weight())
    with pytest.raises(ValueError, match="incomplete.*qweight"):
        list(dequantize_checkpoint([("x.qweight", t["qweight"])], {"quant_method": "gptq"}, torch.float32))
    with pytest.raises(ValueError, match="unsupported quant_method 'bitsandbytes'"):
        list(dequantize_checkpoint([], {"quant_method": "bitsandbytes"}, torch.float32))
    with pytest.raises(ValueError, match="gemv"):
        list(dequantize_checkpoint([], {"quant_method": "awq", "version": "gemv"}, torch.float32))
