"""The fused elementwise kernels equal their torch twins on fresh random inputs (GPU, or Triton's interpreter)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from llmctl.runtime.kernels import fused  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [256, 320])
@pytest.mark.parametrize("plus_one", [False, True], ids=["llama", "gemma"])
def test_rms_norm_with_and_without_residual(dtype, hidden, plus_one):
    x = torch.randn(37, hidden, device=DEVICE).to(dtype)
    res = torch.randn(37, hidden, device=DEVICE).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(dtype)
    torch.testing.assert_close(fused.rms_norm(x, w, 1e-5, plus_one=plus_one),
                               fused.rms_norm_ref(x, w, 1e-5, plus_one=plus_one), **tol(dtype))
    out, new_res = fused.rms_norm(x, w, 1e-5, res, plus_one)
    ref_out, ref_res = fused.rms_norm_ref(x, w, 1e-5, res, plus_one)
    torch.testing.assert_close(new_res, ref_res, rtol=0, atol=0)
    torch.testing.assert_close(out, ref_out, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    x = torch.randn(19, 2 * 640, device=DEVICE).to(dtype)
    torch.testing.assert_close(fused.silu_and_mul(x), fused.silu_and_mul_ref(x), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_tanh_and_mul(dtype):
    x = (4 * torch.randn(19, 2 * 640, device=DEVICE)).to(dtype)  # wide: both tails of the tanh
    torch.testing.assert_close(fused.gelu_tanh_and_mul(x), fused.gelu_tanh_and_mul_ref(x), **tol(dtype))


def test_gemma_norm_matches_transformers():
    import transformers.models.gemma2.modeling_gemma2 as gemma2

    norm = gemma2.Gemma2RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(5, 64)
    torch.testing.assert_close(fused.rms_norm_ref(x, norm.weight, 1e-6, plus_one=True), norm(x), rtol=0, atol=0)


def test_bad_shapes_are_value_errors():
    with pytest.raises(ValueError, match="weight must be"):
        fused.rms_norm(torch.randn(2, 8), torch.ones(4), 1e-5)
    with pytest.raises(ValueError, match="contiguous"):
        fused.silu_and_mul(torch.randn(8, 4).t())
