"""FP8 linears: the FP8 GEMM against its torch twin (the same FP8 operands, dequantized, in fp32) and against
the dense weight; fusing parts with per-tensor, per-channel and block scales, static and dynamic input
scales. Channel scales run `torch._scaled_mm` on CPU too; block scales need a Hopper GPU."""

from __future__ import annotations

import pytest
import torch

from llmctl.checkpoint.formats.weights import Fp8Weight
from llmctl.runtime.kernels.fp8_gemv import gemv_ref
from llmctl.runtime.layers.fp8_linear import (
    FP8,
    FP8_MAX,
    Fp8Linear,
    choose_path,
    fp8_linear,
    linear_ref,
    quantize_rows,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


def fp8_weight(out: int, inp: int, kind: str, seed: int = 0) -> tuple[Fp8Weight, torch.Tensor]:
    """A random weight quantized to FP8 with `kind` scales, and the dense weight it stands for."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(out, inp, generator=g) * 0.05
    if kind == "tensor":
        scale = (dense.abs().max() / FP8_MAX).reshape(1, 1)
        block = None
    elif kind == "channel":
        scale = dense.abs().amax(1, keepdim=True) / FP8_MAX
        block = None
    else:
        scale = dense.unflatten(0, (-1, 128)).unflatten(-1, (-1, 128)).abs().amax((1, 3)) / FP8_MAX
        block = (128, 128)
    w = Fp8Weight(torch.zeros(out, inp, dtype=FP8), scale.float(), block)
    w.weight = (dense / w.dense_scale()).to(FP8)
    return w, w.dequantize()


def test_activations_quantize_per_row_and_per_group():
    x = torch.randn(5, 256) * torch.arange(1, 6)[:, None]
    q, scale = quantize_rows(x, None)
    assert q.dtype == FP8 and scale.shape == (5, 1)
    assert torch.allclose(q.float().abs().amax(1), torch.full((5,), FP8_MAX))
    q, scale = quantize_rows(x, 128)
    assert scale.shape == (5, 2)
    torch.testing.assert_close(q.float() * scale.repeat_interleave(128, 1), x, rtol=0.07, atol=1e-6)
    zeros, scale = quantize_rows(torch.zeros(2, 128), 128)
    assert torch.isfinite(scale).all() and (zeros.float() == 0).all()


@pytest.mark.parametrize("kinds", [("channel",), ("tensor", "tensor", "tensor"), ("channel", "tensor")])
@pytest.mark.parametrize("static", [False, True])
def test_fp8_gemm_equals_its_twin_and_is_close_to_dense(kinds, static):
    if not torch.cuda.is_available() and DEVICE.type != "cpu":
        pytest.skip("needs CUDA")
    """7 rows (on a GPU: the weight-only GEMV, against its own twin) and 40 (the FP8 GEMM, against the twin
    that quantizes the activations as it does)."""
    sizes = [256, 128, 128][: len(kinds)]
    parts, dense = zip(*(fp8_weight(n, 256, k, seed=i) for i, (n, k) in enumerate(zip(sizes, kinds))))
    x = torch.randn(40, 256, generator=torch.Generator().manual_seed(9))
    for p in parts:
        p.input_scale = x.abs().max() / FP8_MAX if static else None
    layer = Fp8Linear(256, list(sizes))
    for i, p in enumerate(parts):
        layer.load(i, Fp8Weight(p.weight.to(DEVICE), p.scale.to(DEVICE), p.block,
                                None if p.input_scale is None else p.input_scale.to(DEVICE)))
    assert layer.scale.shape == (sum(sizes), 1)  # per-tensor scales became per-channel, exactly
    assert layer.dense is None
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    for rows in (7, 40):
        xd = x[:rows].to(DEVICE, dtype)
        got = layer(xd).float()
        if choose_path(xd, False, layer.input_scale, layer.gemv_rows) == "gemv":
            twin = gemv_ref(xd, layer.weight, layer.scale).float()
        else:
            twin = linear_ref(xd.float(), layer.weight, layer.scale, False, layer.input_scale).float()
        torch.testing.assert_close(got, twin, rtol=2e-2, atol=2e-2 * twin.abs().max().item())
        expected = x[:rows] @ torch.cat(dense).T
        assert (got.cpu() - expected).abs().max() < 0.05 * expected.abs().max()  # FP8 activations cost ~3%


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="paths are checked on CUDA only, and the FP8 GEMM needs sm_89+")
def test_each_path_is_checked_once_per_shape(monkeypatch):
    """Loading checks that the device runs the GEMM (and the GEMV) for a weight and agrees with its twin: once
    per shape and recipe, not once per layer (a 7B model has 128 FP8 linears of 4 shapes)."""
    from llmctl.runtime.layers import fp8_linear as module

    checked = []
    real = Fp8Linear._check_path
    monkeypatch.setattr(module, "_works", {})
    monkeypatch.setattr(Fp8Linear, "_check_path", lambda self, path, rows: checked.append((path, rows))
                        or real(self, path, rows))
    for seed in range(3):
        w, _ = fp8_weight(256, 512, "channel", seed)
        layer = Fp8Linear(512, [256])
        layer.load(0, Fp8Weight(w.weight.cuda(), w.scale.cuda(), None))
        assert layer.dense is None
    assert checked == [(None, 17), ("gemv", 1), ("gemv", 3)]  # the GEMM at 17 rows, the GEMV at 1 and 3: once


@pytest.mark.skipif(not HOPPER, reason="block-scaled FP8 GEMMs need a Hopper GPU")
def test_block_scaled_fp8_gemm_equals_its_twin():
    parts, dense = zip(*(fp8_weight(n, 512, "block", seed=i) for i, n in enumerate([256, 128, 128])))
    layer = Fp8Linear(512, [256, 128, 128])
    for i, p in enumerate(parts):
        layer.load(i, Fp8Weight(p.weight.cuda(), p.scale.cuda(), p.block))
    assert layer.block and layer.scale.shape == (4, 4)
    assert layer.dense is None  # the device's block GEMM took these shapes
    x = torch.randn(33, 512, device="cuda", dtype=torch.bfloat16)
    got = layer(x).float()
    twin = linear_ref(x.float(), layer.weight, layer.scale, True).float()
    torch.testing.assert_close(got, twin, rtol=2e-2, atol=2e-2 * twin.abs().max().item())
    expected = x.float() @ torch.cat(dense).cuda().T
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


def test_fusing_refuses_what_it_cannot_run():
    w, _ = fp8_weight(128, 256, "channel")
    layer = Fp8Linear(256, [128])
    with pytest.raises(ValueError, match="where \\[128, 256\\] was expected"):
        layer.load(0, Fp8Weight(w.weight[:, :128], w.scale))
    with pytest.raises(ValueError, match="cannot load a QuantizedWeight"):
        from llmctl.checkpoint.formats.weights import QuantizedWeight

        layer.load(0, QuantizedWeight(torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1, 1), torch.zeros(1), 4, 1))
    odd = Fp8Linear(256, [128])
    with pytest.raises(ValueError, match="blocks must be 128 x 128"):
        odd.load(0, Fp8Weight(w.weight, torch.ones(2, 4), (64, 64)))


def test_the_gemm_call_matches_on_this_device_for_channel_scales():
    w, _ = fp8_weight(64, 128, "channel")
    x = torch.randn(3, 128).to(DEVICE)
    out = fp8_linear(x, w.weight.to(DEVICE), w.scale.to(DEVICE), False)
    assert out.shape == (3, 64) and out.dtype == x.dtype
