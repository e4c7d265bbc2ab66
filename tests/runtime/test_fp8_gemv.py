"""The FP8 decode kernels: the weight-only GEMV equals its torch twin, the fused per-token quantization equals
`quantize_rows` bit for bit, and `fp8_linear` takes each path where it should.

On CUDA the kernels run compiled; without it, under Triton's interpreter (set before triton is imported),
on small shapes with K and N that are not multiples of the blocks. Outputs and workspaces start as NaN, so a
value the kernels fail to write fails the test. The interpreter rounds fp32 to bf16 by truncation, so
outputs are checked to within one unit in the last place of their dtype.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from llmctl.checkpoint.formats.weights import Fp8Weight  # noqa: E402
from llmctl.runtime.kernels import fp8_gemv  # noqa: E402
from llmctl.runtime.kernels.fp8_gemv import GemvConfig, gemv, gemv_ref  # noqa: E402
from llmctl.runtime.kernels.fp8_quant import quantize_per_token  # noqa: E402
from llmctl.runtime.layers import fp8_linear as layer_mod  # noqa: E402
from llmctl.runtime.layers.fp8_linear import (  # noqa: E402
    FP8,
    FP8_MAX,
    GEMV_MAX_ROWS,
    Fp8Linear,
    choose_path,
    fp8_linear,
    quantize_rows,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# torch._scaled_mm runs on CPU and on Hopper; on other GPUs the layer runs dequantized
GEMM = DEVICE == "cpu" or torch.cuda.get_device_capability() >= (9, 0)
CONFIGS = [None, GemvConfig(32, 64, split_k=3)]  # the default, and a split of K into three


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """torch.empty returns NaN-filled tensors (outputs, workspaces, codes: e4m3's NaN) during each test."""
    empty = torch.empty

    def nan_empty(*size, dtype=None, device=None, **kw):
        t = empty(*size, dtype=dtype, device=device, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)


def fp8_weight(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random FP8 weight over e4m3's whole range and its per-channel fp32 scales."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 64).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    scale = torch.rand(n, 1, generator=g) * 1e-3 + 1e-4
    return w.to(DEVICE), scale.to(DEVICE)


def assert_within_an_ulp(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias=None):
    ref = x.float() @ (w.float() * scale).T + (0 if bias is None else bias.float())
    assert got.dtype == x.dtype and got.shape == ref.shape and not got.isnan().any()
    torch.testing.assert_close(got.float(), ref, rtol=torch.finfo(x.dtype).eps, atol=1e-4 * ref.abs().max().item())
    torch.testing.assert_close(got.float(), gemv_ref(x, w, scale, bias).float(), rtol=torch.finfo(x.dtype).eps,
                               atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", CONFIGS, ids=["default", "split3"])
def test_gemv_equals_its_twin(m, dtype, cfg):
    w, scale = fp8_weight(100, 300)  # neither a multiple of any block
    x = torch.randn(m, 300, generator=torch.Generator().manual_seed(m)).to(DEVICE, dtype)
    assert_within_an_ulp(gemv(x, w, scale, cfg=cfg), x, w, scale)


def test_gemv_with_bias_whole_blocks_strided_rows_and_a_second_launch():
    w, scale = fp8_weight(64, 256, seed=1)
    bias = torch.randn(64).to(DEVICE, torch.bfloat16)
    wide = torch.randn(5, 512).to(DEVICE, torch.bfloat16)
    x = wide[:, :256]  # rows 512 apart
    cfg = GemvConfig(16, 32, split_k=4)  # whole blocks: the unmasked loop
    for _ in range(2):  # the split-K counters are back at zero after a launch
        assert_within_an_ulp(gemv(x, w, scale, bias, cfg), x, w, scale, bias)


class Spy:
    """Counts launches of a Triton kernel."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("stages", [1, 2], ids=["in-step", "a-step-ahead"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_packed_words_equal_the_twin(stages, dtype, monkeypatch):
    """One row read as 32-bit words, with and without the loads a step ahead: ragged N, splits whose last step
    is short or must prefetch nothing, whole blocks (unmasked), and every e4m3 code but NaN in one weight."""
    spy = Spy(fp8_gemv._words_kernel)
    monkeypatch.setattr(fp8_gemv, "_words_kernel", spy)
    w, scale = fp8_weight(100, 320)
    x = torch.randn(1, 320, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    for cfg in (GemvConfig(32, 64, 3, 4, stages, True), GemvConfig(16, 128, 1, 4, stages, True)):
        for _ in range(2):  # the split-K counters are back at zero after a launch
            assert_within_an_ulp(gemv(x, w, scale, cfg=cfg), x, w, scale)
    codes = torch.arange(256, dtype=torch.uint8)
    codes[codes == 0x7F] = 0
    codes[codes == 0xFF] = 0  # e4m3's two NaNs, which the quantizer never writes
    tiny = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0x81, 0x85, 0x87, 8, 9, 0x88, 0], dtype=torch.uint8)  # subnormals ...
    tiny = tiny.repeat(256 // 14 + 1)[:256]  # ... and the smallest normals, alone in a row: nothing hides them
    every = torch.stack([codes, codes.flip(0), tiny, tiny.flip(0)]).view(FP8).repeat(16, 1).to(DEVICE)  # [64, 256]
    scales = torch.full((64, 1), 1e-3, device=DEVICE)
    xs = torch.rand(1, 256, generator=torch.Generator().manual_seed(4)).to(DEVICE, dtype)
    assert_within_an_ulp(gemv(xs, every, scales, cfg=GemvConfig(16, 64, 2, 4, stages, True)), xs, every, scales)
    assert spy.launches == 5
    gemv(torch.randn(2, 320).to(DEVICE, dtype), w, scale, cfg=GemvConfig(32, 64, 3, 4, stages, True))
    assert spy.launches == 5  # more than one row takes the byte-typed kernel


def test_gemv_refuses_what_it_cannot_run():
    w, scale = fp8_weight(32, 64)
    x = torch.randn(2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        gemv(x, w, scale)
    with pytest.raises(ValueError, match="one value per output channel"):
        gemv(x.half(), w, scale[:16])
    with pytest.raises(ValueError, match="contiguous rows"):
        gemv(x.half().T, w, scale)
    assert gemv(x.half()[:0], w, scale).shape == (0, 32)


def rows_to_quantize(k: int, dtype: torch.dtype) -> torch.Tensor:
    """Random rows at magnitudes 1e-3 .. 1e3, a row of zeros (and -0.0), one spanning its dtype's range, one
    of e4m3's ties, and (fp32 only) rows at 1e30 and 1e-30."""
    g = torch.Generator().manual_seed(k)
    rows = [torch.randn(k, generator=g) * 10.0 ** e for e in (-3, 0, 3)]
    finfo = torch.finfo(dtype)
    rows.append(torch.zeros(k) * torch.where(torch.arange(k) % 2 == 0, 1.0, -1.0))
    rows.append(torch.logspace(torch.log10(torch.tensor(finfo.tiny)).item() + 1, torch.log10(torch.tensor(finfo.max))
                               .item() - 1, k) * torch.where(torch.arange(k) % 3 == 0, -1.0, 1.0))
    grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8).float()
    grid = grid[grid.isfinite() & (grid >= 0)].unique()
    ties = ((grid[1:] + grid[:-1]) / 2).repeat(-(-k // 126))[:k]
    rows.append(torch.cat([ties[:-1], torch.tensor([FP8_MAX])]))  # absmax 448: the scale is 1
    if dtype == torch.float32:
        rows += [torch.randn(k, generator=g) * 1e30, torch.randn(k, generator=g) * 1e-30]
    return torch.stack(rows).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [1000, 5000])  # one block, and steps of 4096
def test_fused_quantization_equals_quantize_rows_bit_for_bit(dtype, k):
    x = rows_to_quantize(k, dtype)
    q, scale = quantize_per_token(x)
    want_q, want_scale = quantize_rows(x, None)
    assert torch.equal(scale, want_scale)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))


def stand_in(m: int, dtype: torch.dtype = torch.bfloat16, cuda: bool = True) -> SimpleNamespace:
    """What `choose_path` reads of x, for a device this machine may not have."""
    return SimpleNamespace(is_cuda=cuda, shape=(m, 64), dtype=dtype, stride=lambda dim: 1)


def test_choose_path():
    assert choose_path(stand_in(1), False, None) == "gemv"
    assert choose_path(stand_in(GEMV_MAX_ROWS), False, torch.ones(())) == "gemv"  # weight-only: no input scale
    assert choose_path(stand_in(GEMV_MAX_ROWS + 1), False, None) == "fused"
    assert choose_path(stand_in(GEMV_MAX_ROWS + 1), False, torch.ones(())) == "torch"
    assert choose_path(stand_in(4), False, None, gemv_rows=0) == "fused"
    assert choose_path(stand_in(4, torch.float32), False, None) == "fused"
    assert choose_path(stand_in(4, cuda=False), False, None) == "torch"
    assert choose_path(stand_in(4), True, None) == "block"


@pytest.mark.parametrize("path", ["gemv", "fused", "torch"])
def test_each_path_of_fp8_linear_matches_its_twin(path):
    if path != "gemv" and not GEMM:
        pytest.skip("FP8 GEMMs need a Hopper GPU")
    w, scale = fp8_weight(96, 208, seed=2)  # (cuBLAS's FP8 GEMM takes K and N in multiples of 16 only)
    x = torch.randn(5, 208).to(DEVICE, torch.bfloat16)
    got = fp8_linear(x, w, scale, False, path=path)
    if path == "gemv":
        assert_within_an_ulp(got, x, w, scale)
    else:  # the fused quantization feeds the GEMM the very operands quantize_rows does
        assert torch.equal(got, fp8_linear(x, w, scale, False, path="torch"))
        twin = layer_mod.linear_ref(x.float(), w, scale, False)
        torch.testing.assert_close(got.float(), twin.float(), rtol=2e-2, atol=2e-2 * twin.abs().max().item())
    with pytest.raises(ValueError, match="the choices are"):
        fp8_linear(x, w, scale, False, path="block")


@pytest.mark.skipif(not GEMM, reason="FP8 GEMMs need a Hopper GPU")
def test_the_layer_takes_the_gemv_for_few_tokens_on_a_gpu(monkeypatch):
    w, scale = fp8_weight(128, 256, seed=3)
    layer = Fp8Linear(256, [128])
    layer.load(0, Fp8Weight(w, scale))
    calls = []
    monkeypatch.setattr(fp8_gemv, "gemv", lambda *a, **kw: calls.append("gemv") or gemv(*a, **kw))
    monkeypatch.setattr(layer_mod, "quantize_per_token", lambda x: calls.append("fused") or quantize_per_token(x))
    for m in (1, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 1):
        layer(torch.randn(m, 256).to(DEVICE, torch.bfloat16))
    if DEVICE == "cuda":
        assert layer.gemv_rows == GEMV_MAX_ROWS and calls == ["gemv", "gemv", "fused"]
    else:  # on CPU the layer stays on torch's quantization and _scaled_mm
        assert layer.gemv_rows == 0 and calls == []


# -- start-up choice of the GEMV's configuration (fp8_gemv_tune) ------------------------------------------


def test_tiers_cover_every_row_count_up_to_the_gemv_s():
    from llmctl.runtime.kernels import fp8_gemv_tune

    assert fp8_gemv_tune.tiers(GEMV_MAX_ROWS) == [1, 4, 16, 32]
    assert fp8_gemv_tune.tiers(8) == [1, 4]
    assert fp8_gemv_tune.tiers(3) == [1, 3]  # max_num_seqs 3: the 2-8 tier timed at its largest use
    w = torch.empty(64, 128, dtype=FP8)
    assert {fp8_gemv_tune.key(m, w, torch.float16)[-1] for m in range(2, 9)} == {4}
    assert {fp8_gemv_tune.key(m, w, torch.float16)[-1] for m in range(9, 17)} == {16}
    assert fp8_gemv_tune.key(17, w, torch.float16)[-1] == 32


def test_the_fastest_agreeing_configuration_is_chosen(monkeypatch):
    """Timing faked: the quickest candidate wins unless its output disagrees with gemv_ref; none quicker
    than the default leaves the default."""
    from llmctl.runtime.kernels import fp8_gemv_tune, timing

    weight, scale = quantize_weight(48, 256)
    x = torch.randn(1, 256, device=DEVICE).half()
    quick, wrong = fp8_gemv_tune.ONE_ROW[4], fp8_gemv_tune.ONE_ROW[5]
    times = {quick: 1.0, wrong: 0.5}
    monkeypatch.setattr(fp8_gemv_tune, "ONE_ROW", (quick, wrong))
    real = fp8_gemv.gemv

    def gemv(x, w, s, bias=None, cfg=None):
        out = real(x, w, s, bias, cfg)
        return out + 1 if cfg == wrong else out

    timed = []
    monkeypatch.setattr(timing, "graph_ms", lambda fn, *a: (fn(), timed.append(1), times.get(current[0], 2.0))[-1])
    current = [None]

    def gemv_timed(x, w, s, bias=None, cfg=None):
        current[0] = cfg
        return gemv(x, w, s, bias, cfg)

    monkeypatch.setattr(fp8_gemv, "gemv", gemv_timed)
    assert fp8_gemv_tune.fastest(x, weight, scale) == quick
    assert len(timed) == 2, "the default and the agreeing candidate are timed, the wrong one is not"
    times[quick] = 3.0
    assert fp8_gemv_tune.fastest(x, weight, scale) == fp8_gemv.default_config(1, 48, 256, x.device)


def quantize_weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    dense = torch.randn(n, k, device=DEVICE) * 0.1
    scale = dense.abs().amax(1, keepdim=True) / FP8_MAX
    return (dense / scale).to(FP8), scale.float()


@pytest.mark.skipif(DEVICE != "cuda", reason="start-up tuning times CUDA weights only")
def test_pretune_chooses_per_tier_and_the_layer_runs_the_choice(monkeypatch, tmp_path):
    from llmctl.runtime.kernels import fp8_gemv_tune, gemv_cache

    monkeypatch.setattr(fp8_gemv_tune, "_chosen", {})  # nothing an earlier test timed
    monkeypatch.setattr(gemv_cache, "SHIPPED", tmp_path)  # nor a shipped file
    weight, scale = quantize_weight(4096, 4096)
    assert fp8_gemv_tune.pretune([(weight, scale), (weight, scale)], torch.float16, GEMV_MAX_ROWS) == 4
    assert fp8_gemv_tune.pretune([(weight, scale)], torch.float16, GEMV_MAX_ROWS) == 0  # already timed
    for m in (1, 2, 5, 16, 20, 32):
        cfg = fp8_gemv_tune.chosen(m, weight, torch.float16)
        assert cfg is not None
        x = torch.randn(m, 4096, device=DEVICE).half()
        got = fp8_linear(x, weight, scale, False, path="gemv").float()
        want = gemv_ref(x, weight, scale).float()
        assert torch.allclose(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def test_an_outgrown_split_k_counter_buffer_is_kept_for_the_graphs_that_captured_it(monkeypatch):
    from llmctl.runtime.kernels import splitk

    monkeypatch.setattr(splitk, "COUNTERS", {})
    monkeypatch.setattr(splitk, "_RETIRED", [])
    x = torch.zeros(1, 8)
    first = splitk.counters(x, 10)
    assert splitk.counters(x, 1 << 16) is first  # big enough: the same buffer
    grown = splitk.counters(x, (1 << 16) + 1)
    assert grown is not first and grown.numel() == (1 << 16) + 1
    assert len(splitk._RETIRED) == 1 and splitk._RETIRED[0] is first
