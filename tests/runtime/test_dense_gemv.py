"""The one-row GEMV for 16-bit weights (batch-1 decode): equal to F.linear within rounding, with and without
split-K and loads a step ahead; DenseLinear takes it only where start-up timing chose it, and only on CUDA.

Without CUDA the kernel runs under Triton's interpreter on small ragged shapes."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llmctl.runtime.kernels import dense_gemv  # noqa: E402
from llmctl.runtime.kernels.fp8_gemv import GemvConfig  # noqa: E402
from llmctl.runtime.layers.dense_linear import DenseLinear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def close(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias=None) -> None:
    want = x.float() @ w.float().T + (0 if bias is None else bias.float())
    assert got.dtype == x.dtype and got.shape == want.shape and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, rtol=torch.finfo(x.dtype).eps * 2, atol=1e-3 * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", [GemvConfig(16, 64, 1, 4, 1), GemvConfig(32, 64, 3, 4, 2), GemvConfig(8, 128, 2, 4, 2)],
                         ids=["whole-K", "split3-ahead", "split2-ahead"])
def test_gemv_equals_f_linear(dtype, cfg):
    """N = 100 and K = 328 are whole blocks of nothing; splits end on a short step or prefetch nothing."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(100, 328, generator=g).to(DEVICE, dtype)
    bias = torch.randn(100, generator=g).to(DEVICE, dtype)
    wide = torch.randn(3, 400, generator=g).to(DEVICE, dtype)
    x = wide[:, :328]  # rows 400 apart
    for _ in range(2):  # the split-K counters are back at zero after a launch
        close(dense_gemv.gemv(x[:1], w, None, cfg), x[:1], w)
    close(dense_gemv.gemv(x, w, bias, cfg), x, w, bias)


def test_whole_blocks_load_unmasked_and_bad_inputs_are_named():
    w = torch.randn(64, 256).to(DEVICE, torch.float16)
    x = torch.randn(1, 256).to(DEVICE, torch.float16)
    close(dense_gemv.gemv(x, w, None, GemvConfig(16, 128, 2, 4, 2)), x, w)
    with pytest.raises(ValueError, match="float16 or bfloat16 of x's dtype"):
        dense_gemv.gemv(x.float(), w)
    with pytest.raises(ValueError, match="input features"):
        dense_gemv.gemv(x[:, :128], w)
    with pytest.raises(ValueError, match="bias must be contiguous"):
        dense_gemv.gemv(x, w, torch.zeros(63, dtype=torch.float16, device=DEVICE))


def test_dense_linear_is_nn_linear_unless_a_kernel_was_chosen_for_its_shape(monkeypatch):
    torch.manual_seed(0)
    layer = DenseLinear(256, 64, bias=True).to(DEVICE, torch.float16)
    x = torch.randn(1, 256, device=DEVICE, dtype=torch.float16)
    assert isinstance(layer, torch.nn.Linear) and dense_gemv.chosen(layer.weight) is None
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    monkeypatch.setitem(dense_gemv._chosen, dense_gemv.key(layer.weight), GemvConfig(16, 128, 2, 4, 2))
    calls = []
    monkeypatch.setattr(dense_gemv, "gemv", lambda *a: calls.append(a[3]) or F.linear(*a[:3]))
    layer(x), layer(torch.cat([x, x]))
    assert calls == ([GemvConfig(16, 128, 2, 4, 2)] if DEVICE == "cuda" else [])  # one row, on CUDA only
    monkeypatch.setenv("LLMCTL_DENSE_GEMV", "0")
    assert dense_gemv.pretune([layer.weight], torch.float16) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pretune_keeps_cublas_or_a_faster_checked_kernel(monkeypatch, tmp_path):
    from llmctl.runtime.kernels import gemv_cache

    monkeypatch.setattr(gemv_cache, "SHIPPED", tmp_path)  # timed here, not read from a shipped file
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.float16) * 0.02
    dense_gemv._chosen.pop(dense_gemv.key(w), None)
    assert dense_gemv.pretune([w, w], torch.float16) == 1  # one shape
    cfg = dense_gemv.chosen(w)
    layer = DenseLinear(4096, 4096, bias=False, device="cuda", dtype=torch.float16)
    layer.weight.data = w
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    close(layer(x), x, w)
    print("chosen:", cfg)
