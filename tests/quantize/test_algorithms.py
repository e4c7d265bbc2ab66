"""RTN's grid, GPTQ's solver and AWQ's searches on small matrices with known answers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmctl.quantize import awq
from llmctl.quantize.gptq import GPTQConfig, Hessian, gptq
from llmctl.quantize.grid import fit, rtn


def correlated_inputs(tokens=2048, dim=128, seed=0) -> torch.Tensor:
    """Activations with correlated channels and a few large ones, like a real layer's input."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=g) @ torch.randn(dim, dim, generator=g) / dim**0.5
    x[:, :4] *= 8
    return x


def output_error(x, w, w_q) -> float:
    return ((x @ (w_q - w).T).pow(2).sum() / (x @ w.T).pow(2).sum()).item()


# -- grid / RTN ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 57])
def test_rtn_rounds_to_the_nearest_level_within_range(seed):
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(seed))
    q = rtn(w, 4, 16, sym=False)
    assert q.qweight.min() >= 0 and q.qweight.max() <= 15 and q.scales.shape == (8, 4)
    step = q.scales[:, q.g_idx.long()]
    # Half a step, plus what rounding the scale to fp16 (relative 2^-11) moves the grid's ends over 15 steps:
    # a group's extreme weight can fall just outside the rounded grid (seed 57 does).
    assert ((q.dequantize() - w).abs() <= step / 2 + 16 * step * 2**-11).all()
    assert torch.equal(q.scales, q.scales.half().float())  # what the checkpoint will store, exactly


def test_symmetric_grid_fixes_the_zero_and_v1_grids_avoid_zero_zero():
    w = torch.randn(8, 64)
    assert (rtn(w, 4, 16, sym=True).zeros == 8).all()
    positive = torch.rand(4, 16) + 0.1  # an all-positive group would get zero point 0 ...
    assert (fit(positive, 4, sym=False)[1] == 0).all()
    assert (fit(positive, 4, sym=False, min_zero=1)[1] == 1).all()  # ... which GPTQ v1 cannot store


# -- GPTQ ---------------------------------------------------------------------------------------------

def test_hessian_is_the_running_mean_of_2xxT():
    x = torch.randn(300, 16)
    h = Hessian(16, torch.device("cpu"))
    for chunk in x.split(70):
        h.add(chunk[None])  # [batch, tokens, in] like a linear's input
    torch.testing.assert_close(h.H, 2 * x.T @ x / 300, rtol=1e-4, atol=1e-5)


def test_gptq_with_uncorrelated_inputs_is_rtn():
    # A diagonal Hessian has nothing to propagate: every column rounds on its own.
    w = torch.randn(32, 128)
    q, _ = gptq(w, torch.diag(torch.rand(128) + 0.5), GPTQConfig(group_size=32))
    assert torch.equal(q.qweight, rtn(w, 4, 32, sym=True, min_zero=1).qweight)


@pytest.mark.parametrize("cfg", [GPTQConfig(), GPTQConfig(group_size=32), GPTQConfig(sym=False),
                                 GPTQConfig(desc_act=True), GPTQConfig(desc_act=True, static_groups=True),
                                 GPTQConfig(group_size=-1)], ids=str)
def test_gptq_beats_rtn_on_correlated_inputs(cfg):
    x, w = correlated_inputs(), torch.randn(64, 128)
    q, loss = gptq(w, 2 * x.T @ x / len(x), cfg)
    base = rtn(w, cfg.bits, cfg.group_size, cfg.sym, cfg.min_zero)
    assert output_error(x, w, q.dequantize()) < 0.8 * output_error(x, w, base.dequantize())
    assert loss > 0


def test_gptq_act_order_groups():
    x, w = correlated_inputs(), torch.randn(16, 128)
    H = 2 * x.T @ x / len(x)
    q, _ = gptq(w, H, GPTQConfig(group_size=32, desc_act=True))
    # Groups follow the order of decreasing H diagonal: the largest channels (0..3) fall in group 0.
    assert q.g_idx[:4].tolist() == [0, 0, 0, 0]
    assert torch.bincount(q.g_idx.long()).tolist() == [32, 32, 32, 32]
    assert not torch.equal(q.g_idx.long(), torch.arange(128) // 32)
    static, _ = gptq(w, H, GPTQConfig(group_size=32, desc_act=True, static_groups=True))
    assert torch.equal(static.g_idx.long(), torch.arange(128) // 32)


def test_gptq_quantizes_dead_channels_to_zero():
    w, H = torch.randn(8, 32), torch.eye(32)
    H[5, 5] = 0
    q, _ = gptq(w, H, GPTQConfig(group_size=-1))
    assert q.dequantize()[:, 5].abs().max() == 0


# -- AWQ ----------------------------------------------------------------------------------------------

def test_apply_scale_keeps_the_float_function():
    torch.manual_seed(0)
    x = torch.randn(10, 32)
    norm_w, fc, prev = torch.rand(32) + 0.5, nn.Linear(32, 16, bias=False), nn.Linear(32, 32, bias=True)
    norm = nn.Module()
    norm.weight = nn.Parameter(norm_w.clone())
    s = torch.rand(32) + 0.5
    before = fc(x * norm.weight)
    awq.apply_scale(norm, [fc], s)
    torch.testing.assert_close(fc(x * norm.weight), before)
    fc2 = nn.Linear(32, 8, bias=False)
    chained = fc2(prev(x))
    awq.apply_scale(prev, [fc2], s)  # linear -> linear: prev's output rows and bias take 1/s
    torch.testing.assert_close(fc2(prev(x)), chained)


def test_scale_search_protects_salient_channels():
    torch.manual_seed(0)
    x = correlated_inputs(512, 128)[None]  # [1, tokens, in]
    fc = nn.Linear(128, 64, bias=False)
    norm = nn.Module()
    norm.weight = nn.Parameter(torch.ones(128))
    w = fc.weight.detach().clone()
    base = output_error(x[0], w, rtn(w, 4, 32, sym=False, min_zero=0).dequantize())
    group = awq.ScaleGroup(norm, [fc], fc, x, x.abs().mean(dim=(0, 1)))
    s = awq.search_scale(group, 4, 32, sym=False)
    assert torch.equal(fc.weight, w)  # the search leaves the weights as it found them
    awq.apply_scale(norm, [fc], s)
    scaled = rtn(fc.weight.detach(), 4, 32, sym=False, min_zero=0).dequantize() / s  # effective weight on x
    assert output_error(x[0], w, scaled) < 0.9 * base
    assert s[:4].mean() > s[4:].mean()  # the large channels are the ones scaled up


def test_clip_search_never_does_worse_than_no_clipping():
    torch.manual_seed(0)
    x, w = correlated_inputs(256, 64), torch.randn(32, 64)
    max_val = awq.search_clip(w, x, 4, 32, sym=False)
    assert max_val.shape == (32, 2, 1)
    org_max = w.view(32, 2, 32).abs().amax(dim=-1, keepdim=True)
    assert (max_val <= org_max).all() and (max_val < org_max).float().mean() > 0.25  # Gaussian tails do get clipped
    clipped = torch.clamp(w.view(32, 2, 32), -max_val, max_val).view(32, 64)
    assert output_error(x, w, rtn(clipped, 4, 32, False).dequantize()) < output_error(x, w, rtn(w, 4, 32, False).dequantize())
