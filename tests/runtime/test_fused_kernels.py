"""The fused elementwise kernels equal their torch twins on fresh random inputs (GPU, or Triton's interpreter)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from llmctl.runtime.kernels import fused  # noqa: E402
from llmctl.runtime.layers.rotary import RotaryEmbedding  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [256, 320])
def test_rms_norm_with_and_without_residual(dtype, hidden):
    x = torch.randn(37, hidden, device=DEVICE).to(dtype)
    res = torch.randn(37, hidden, device=DEVICE).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(dtype)
    torch.testing.assert_close(fused.rms_norm(x, w, 1e-5), fused.rms_norm_ref(x, w, 1e-5), **tol(dtype))
    out, new_res = fused.rms_norm(x, w, 1e-5, res)
    ref_out, ref_res = fused.rms_norm_ref(x, w, 1e-5, res)
    torch.testing.assert_close(new_res, ref_res, rtol=0, atol=0)
    torch.testing.assert_close(out, ref_out, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 2, 64), (6, 6, 32)])
def test_rotary_in_place_on_views_of_a_fused_projection(dtype, heads, kv_heads, head_dim):
    rope = RotaryEmbedding(head_dim, 512, 10000.0, None, device=DEVICE)
    tokens = 29
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=DEVICE).to(dtype)
    positions = torch.randint(0, 512, (tokens,), device=DEVICE)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)
    want_q = fused.rotary_ref(positions, q, rope.cos, rope.sin)
    want_k = fused.rotary_ref(positions, k, rope.cos, rope.sin)
    v_before = v.clone()
    fused.rotary_(positions, q, rope.cos, rope.sin)
    fused.rotary_(positions, k, rope.cos, rope.sin)
    torch.testing.assert_close(q, want_q, **tol(dtype))
    torch.testing.assert_close(k, want_k, **tol(dtype))
    assert torch.equal(v, v_before)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    x = torch.randn(19, 2 * 640, device=DEVICE).to(dtype)
    torch.testing.assert_close(fused.silu_and_mul(x), fused.silu_and_mul_ref(x), **tol(dtype))


def test_bad_shapes_are_value_errors():
    with pytest.raises(ValueError, match="weight must be"):
        fused.rms_norm(torch.randn(2, 8), torch.ones(4), 1e-5)
    with pytest.raises(ValueError, match="contiguous"):
        fused.silu_and_mul(torch.randn(8, 4).t())
    with pytest.raises(ValueError, match="head_dim"):
        fused.rotary_(torch.zeros(2, dtype=torch.long), torch.randn(2, 1, 6), torch.ones(8, 6), torch.ones(8, 6))
