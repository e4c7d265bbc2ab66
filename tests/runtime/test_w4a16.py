"""The W4A16 kernels equal the torch dequantizing reference on fresh random weights and inputs.

GPTQ (symmetric, asymmetric, act-order) and AWQ, groups of 32 / 64 / 128, fp16 and bf16, odd M, and
K / N that are not multiples of the blocks: on the GPU, or under Triton's interpreter on CPU (small
shapes and large blocks there: the interpreter pays per program).
"""

from __future__ import annotations

import dataclasses
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import triton  # noqa: E402

from llmctl.checkpoint.formats.awq import awq_tensors, dequantize_awq  # noqa: E402
from llmctl.checkpoint.formats.gptq import dequantize_gptq, gptq_tensors  # noqa: E402
from llmctl.checkpoint.formats.weights import QuantizedWeight  # noqa: E402
from llmctl.runtime.kernels import w4a16  # noqa: E402
from llmctl.runtime.kernels.w4a16 import common as w4a16_common  # noqa: E402
from llmctl.runtime.kernels.w4a16 import dispatch as w4a16_dispatch  # noqa: E402
from llmctl.runtime.kernels.w4a16 import gemv as w4a16_gemv  # noqa: E402
from llmctl.runtime.kernels.w4a16 import gemv_h2 as w4a16_gemv_h2  # noqa: E402
from llmctl.runtime.kernels.w4a16 import gemv_rows as w4a16_gemv_rows  # noqa: E402
from llmctl.runtime.kernels.w4a16 import tiled as w4a16_tiled  # noqa: E402
from llmctl.runtime.kernels.w4a16.pack import (  # noqa: E402
    PackedW4,
    can_concat,
    concat,
    dequantize,
    from_awq,
    from_gptq,
    interleaved_rows,
    linear_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FORMATS = ["gptq-sym", "gptq-asym", "gptq-act-order", "awq"]


def random_weight(fmt: str, k: int, n: int, group_size: int, seed: int = 0) -> tuple[QuantizedWeight, dict]:
    """A random quantized weight and its checkpoint tensors in fmt (the layouts quantize/ writes)."""
    gen = torch.Generator().manual_seed(seed)
    groups = k // group_size
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    scales = (torch.rand(n, groups, generator=gen) * 0.02 + 0.002).half().float()
    zeros = torch.full((n, groups), 8, dtype=torch.int32) if fmt == "gptq-sym" else \
        torch.randint(1, 16, (n, groups), generator=gen, dtype=torch.int32)
    g_idx = torch.arange(k, dtype=torch.int32) // group_size
    if fmt == "gptq-act-order":
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    qw = QuantizedWeight(codes, scales, zeros, g_idx, 4, group_size)
    return qw, (awq_tensors(qw) if fmt == "awq" else gptq_tensors(qw))


def packed(fmt: str, k: int, n: int, group_size: int, seed: int = 0) -> PackedW4:
    _, t = random_weight(fmt, k, n, group_size, seed)
    w = from_awq(**t) if fmt == "awq" else from_gptq(**t)
    return PackedW4(*(v.to(DEVICE) if isinstance(v, torch.Tensor) else v for v in vars(w).values()))


def check(out: torch.Tensor, x: torch.Tensor, w: PackedW4, bias=None) -> None:
    ref = linear_ref(x, w, bias)
    assert out.shape == ref.shape and out.dtype == x.dtype
    scale = ref.float().abs().max().item()
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=1e-2 * scale)


# -- repacking is exact ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_repack_dequantizes_exactly_like_the_checkpoint_reader(fmt, group_size):
    qw, t = random_weight(fmt, 256, 48, group_size)
    if fmt == "awq":
        want, got = dequantize_awq(**t), dequantize(from_awq(**t))
    else:
        want, got = dequantize_gptq(**t, bits=4), dequantize(from_gptq(**t))
        assert (from_gptq(**t).perm is not None) == (fmt == "gptq-act-order")
    assert torch.equal(got, want) and torch.equal(got, qw.dequantize())


def test_fusing_needs_the_same_act_order():
    a, b = packed("gptq-asym", 128, 16, 32, 1), packed("gptq-asym", 128, 24, 32, 2)
    fused = concat([a, b])
    assert fused.out_features == 40 and torch.equal(dequantize(fused), torch.cat([dequantize(a), dequantize(b)]))
    assert not can_concat(packed("gptq-act-order", 128, 16, 32, 1), packed("gptq-act-order", 128, 16, 32, 2))
    assert not can_concat(a, packed("gptq-asym", 128, 16, 64))


def test_uneven_act_order_groups_are_refused():
    _, t = random_weight("gptq-act-order", 128, 16, 32)
    t["g_idx"][t["g_idx"] == 0] = 1  # group 1 gets 64 channels, group 0 none
    with pytest.raises(ValueError, match="groups are not all 32"):
        from_gptq(**t)


# -- each path equals the reference ----------------------------------------------------------------

# (format, group size, dtype) combinations: every format meets every group size and both dtypes
# across the paths without the full product, which the interpreter could not afford.
CASES = [("gptq-sym", 32, torch.float16), ("gptq-asym", 64, torch.bfloat16), ("gptq-act-order", 128, torch.float16),
         ("awq", 32, torch.bfloat16), ("gptq-act-order", 64, torch.bfloat16), ("awq", 128, torch.float16),
         ("gptq-asym", 128, torch.float16), ("gptq-sym", 64, torch.bfloat16)]
K, N = 384, 72  # K is 1.5 blocks of 256 and N not a multiple of 64; both are whole groups and words


@pytest.mark.parametrize("fmt, group_size, dtype", CASES)
def test_gemv_split_k(fmt, group_size, dtype):
    w = packed(fmt, K, N, group_size)
    x = torch.randn(3, K, device=DEVICE).to(dtype)
    bias = torch.randn(N, device=DEVICE).to(dtype)
    for _ in range(2):  # the second launch finds every split-K counter reset by the first
        check(w4a16_gemv.gemv(x, w, None, w4a16.Config("gemv", 1, 64, 256, 2)), x, w)
    check(w4a16_gemv.gemv(x[:1], w, bias, w4a16.Config("gemv", 1, 128, 64, 1)), x[:1], w, bias)
    check(w4a16_gemv.gemv(x[:2], w, bias, w4a16.Config("gemv", 1, 32, 64, 4)), x[:2], w, bias)


@pytest.mark.parametrize("fmt, group_size", [("gptq-sym", 32), ("gptq-asym", 64), ("gptq-act-order", 128),
                                             ("awq", 128), ("gptq-act-order", 64)])
def test_gemv_fp16x2(fmt, group_size):
    w = packed(fmt, K, N, group_size)
    x = torch.randn(3, K, device=DEVICE).half()
    bias = torch.randn(N, device=DEVICE).half()
    bk = min(128, group_size)
    for _ in range(2):  # the second launch finds every split-K counter reset by the first
        check(w4a16_gemv_h2.gemv_h2(x, w, None, w4a16.Config("gemv_h2", 1, 64, bk, 2, 4, 1)), x, w)
    check(w4a16_gemv_h2.gemv_h2(x[:1], w, bias, w4a16.Config("gemv_h2", 1, 256, 32, 1, 2, 1)), x[:1], w, bias)
    check(w4a16_gemv_h2.gemv_h2(x[:2], w, bias, w4a16.Config("gemv_h2", 1, 128, bk, 4, 8, 1)), x[:2], w, bias)
    for split in (1, 2):  # each step's loads issued a step ahead (num_stages 2), the last step of a split loading none
        want = w4a16_gemv_h2.gemv_h2(x, w, bias, w4a16.Config("gemv_h2", 1, 64, bk, split, 4, 1))
        assert torch.equal(w4a16_gemv_h2.gemv_h2(x, w, bias, w4a16.Config("gemv_h2", 1, 64, bk, split, 4, 2)), want)


@pytest.mark.parametrize("fmt, group_size, rows, split, m, stages", [("gptq-sym", 32, 2, 1, 3, 1),
                                                                     ("gptq-act-order", 128, 4, 2, 7, 2),
                                                                     ("awq", 64, 8, 3, 5, 2)])
def test_gemv_rows_equals_the_one_row_gemv(fmt, group_size, rows, split, m, stages):
    """Several rows a program, M not a multiple of them, loads a step ahead or not: every row equals gemv_h2's,
    bit for bit."""
    w = packed(fmt, K, N, group_size)
    x = torch.randn(m, K, device=DEVICE).half()
    bias = torch.randn(N, device=DEVICE).half()
    bk = min(128, group_size)
    want = w4a16_gemv_h2.gemv_h2(x, w, bias, w4a16.Config("gemv_h2", 1, 64, bk, split, 4, 1))
    for _ in range(2):  # the second launch finds every split-K counter reset by the first
        out = w4a16_gemv_rows.gemv_rows(x, w, bias, w4a16.Config("gemv_rows", rows, 64, bk, split, 4, stages))
        check(out, x, w, bias)
        assert torch.equal(out, want)
    with pytest.raises(ValueError, match="rows a program"):
        w4a16_gemv_rows.gemv_rows(x, w, None, w4a16.Config("gemv_rows", 3, 64, bk))


def test_gemv_rows_shares_each_unpacked_word_among_its_rows_on_sm90(sass_loop):
    """Static: the main loop of 4 rows a program costs well under four one-row loops (each word is loaded and
    unpacked once), and nothing spills. A layout that spreads the rows over threads (as a 3-D tile did) fails."""
    shape = ["--k", "1024", "--n", "256"]
    one = sass_loop("w4a16", "--path", "gemv_h2", "--m", "1", "--cfg", "1,64,128,1,4,1", *shape)
    four = sass_loop("w4a16", "--path", "gemv_rows", "--m", "4", "--cfg", "4,64,128,1,4,1", *shape)
    assert four["instructions"] < 2.2 * one["instructions"], (one, four)
    assert four["ops"]["LOP3"] <= one["ops"]["LOP3"] + 4, (one, four)


def test_gemv_fp16x2_sums_cannot_overflow_and_other_inputs_take_the_fp32_gemv():
    """x at fp16's largest values: (q - z) * x would overflow fp16; the kernel's 1/128 keeps every partial
    sum in range. bf16 x, and x whose rows are not 4-byte aligned, run the fp32 GEMV instead."""
    w = packed("gptq-asym", 256, 64, 128)
    w = dataclasses.replace(w, scales=torch.full_like(w.scales, 1e-3))
    x = torch.full((1, 256), 0.5, device=DEVICE).half()
    x[0, :16] = 60000.0
    out = w4a16_gemv_h2.gemv_h2(x, w, None, w4a16.Config("gemv_h2", 1, 64, 128, 1, 4, 1))
    assert torch.isfinite(out).all()
    check(out, x, w)
    cfg = w4a16.Config("gemv_h2", 1, 64, 128, 1, 4, 1)
    xb = torch.randn(2, 256, device=DEVICE).to(torch.bfloat16)
    assert torch.equal(w4a16_gemv_h2.gemv_h2(xb, w, None, cfg), w4a16_gemv.gemv(xb, w, None, cfg))
    xo = torch.randn(2, 257, device=DEVICE).half()[:, 1:]  # rows start at odd halves
    assert torch.equal(w4a16_gemv_h2.gemv_h2(xo, w, None, cfg), w4a16_gemv.gemv(xo, w, None, cfg))


def test_gemv_fp16x2_zero_point_sixteen():
    """GPTQ v1 stores zero - 1, so a stored 15 is a zero point of 16: one past the 4-bit codes."""
    w = packed("gptq-asym", 256, 64, 64)
    w = dataclasses.replace(w, zeros=torch.full_like(w.zeros, 16))
    x = torch.randn(2, 256, device=DEVICE).half()
    check(w4a16_gemv_h2.gemv_h2(x, w, None, w4a16.Config("gemv_h2", 1, 64, 64, 2, 4, 1)), x, w)


def test_blocks_must_not_straddle_groups():
    """A group of 192 channels: a block of 128 would mix two groups' scales; the choice falls to 64."""
    w = packed("gptq-asym", 384, 16, 192)
    with pytest.raises(ValueError, match="inside one group"):
        w4a16_gemv.gemv(torch.randn(1, 384, device=DEVICE).half(), w, None, w4a16.Config("gemv", 1, 64, 128))
    for m in (1, 16):
        assert w4a16_dispatch.heuristic(m, w).block_k == 64
    assert torch.equal(w4a16.dequantize(w, torch.float16).T.float().cpu(), dequantize(w).half().float().cpu())
    x = torch.randn(1, 384, device=DEVICE).half()
    check(w4a16_dispatch.w4a16_linear(x, w), x, w)


def test_block_sizes_are_powers_of_two_for_any_group():
    """Groups of 96: the largest block inside one group is 32, not 96 (a Triton block is a power of two)."""
    w = packed("gptq-asym", 192, 16, 96)
    assert w4a16_dispatch.heuristic(1, w).block_k == 32
    x = torch.randn(1, 192, device=DEVICE).half()
    check(w4a16_gemv_h2.gemv_h2(x, w), x, w)


@pytest.mark.parametrize("fmt, group_size, dtype", CASES)
def test_tiled(fmt, group_size, dtype):
    w = packed(fmt, K, N, group_size)
    x = torch.randn(37, K, device=DEVICE).to(dtype)
    bias = torch.randn(N, device=DEVICE).to(dtype)
    check(w4a16_tiled.tiled(x, w, bias, w4a16.Config("tiled", 32, 64, 256, 1)), x, w, bias)
    check(w4a16_tiled.tiled(x[:5], w, None, w4a16.Config("tiled", 16, 128, 128, 3)), x[:5], w)
    check(w4a16_tiled.tiled(x, w, bias, w4a16.Config("tiled", 64, 64, 64, 2, 4, 2)), x, w, bias)
    check(w4a16_tiled.tiled(x[:20], w, None, w4a16.Config("tiled", 16, 32, 128, 2)), x[:20], w)  # last split short
    check(w4a16_tiled.tiled(x[:3], w, None, w4a16.Config("tiled", 16, 32, 128, 8)), x[:3], w)  # splits with no block
    even = packed(fmt, 512, 128, group_size)  # whole blocks of K and of N: the unmasked loop
    xe = torch.randn(21, 512, device=DEVICE).to(dtype)
    bias_e = torch.randn(128, device=DEVICE).to(dtype)
    for cfg in (w4a16.Config("tiled", 16, 64, 128, 2), w4a16.Config("tiled", 32, 128, 256, 1),
                w4a16.Config("tiled", 16, 64, 128, 3),  # splits of 256: the last one is past K
                w4a16.Config("tiled", 16, 128, 64, 3)):  # splits of 192: the last one is short
        assert w4a16_tiled.even(even, cfg) and not w4a16_tiled.even(w, cfg)
        check(w4a16_tiled.tiled(xe, even, bias_e, cfg), xe, even, bias_e)


def test_tiled_fp32_activations():
    w = packed("gptq-asym", 384, 40, 64)
    x = torch.randn(17, 384, device=DEVICE)
    torch.testing.assert_close(w4a16_tiled.tiled(x, w, None, w4a16.Config("tiled", 32, 32, 256, 2)), linear_ref(x, w),
                               rtol=1e-5, atol=1e-4)


def test_interleaved_packing_holds_every_channel_once():
    """Word 4i + c of a 32-channel chunk holds channels 2c + 8j + p at nibble j + 4p: a permutation."""
    rows = interleaved_rows(64)
    assert sorted(rows.tolist()) == list(range(64))
    assert rows[:8].tolist() == [0, 8, 16, 24, 1, 9, 17, 25] and rows[8:16].tolist() == [2, 10, 18, 26, 3, 11, 19, 27]
    assert rows[32:40].tolist() == [32, 40, 48, 56, 33, 41, 49, 57]


@pytest.mark.parametrize("k, group_size", [(160, 16), (200, 40)])
def test_weights_the_kernels_cannot_read_take_the_dense_path(k, group_size):
    """Groups of 16 or K not a multiple of 32: the packing stays in GPTQ's order and only the dequantize +
    matmul path reads it; the kernels refuse it by name."""
    w = packed("gptq-asym", k, 24, group_size)
    assert not w.interleaved
    x = torch.randn(5, k, device=DEVICE).half()
    with pytest.raises(ValueError, match="interleaved"):
        w4a16_tiled.tiled(x, w, None, w4a16.Config("tiled", 16, 32, 32))
    assert w4a16_dispatch.candidates(5, w) == [w4a16.Config("dense")]
    assert w4a16_dispatch.heuristic(5, w) == w4a16.Config("dense")
    check(w4a16_dispatch.w4a16_linear(x, w), x, w)
    with pytest.raises(ValueError, match="packed in GPTQ order"):
        dataclasses.replace(w, interleaved=True)  # one packing per shape: a flag cannot disagree with the words


def test_odd_groups_still_get_a_tensor_core_candidate():
    """Groups of 96: no block of 64 or more fits, so the candidates add the largest that does (32)."""
    w = packed("gptq-asym", 192, 16, 96)
    for m, dtype in ((16, torch.bfloat16), (40, torch.float16), (100, torch.float32)):
        tiled = [c for c in w4a16_dispatch.candidates(m, w, dtype) if c.kind == "tiled"]
        assert tiled and all(c.block_k == 32 for c in tiled)


@pytest.mark.parametrize("fmt, group_size, dtype", CASES[:4])
def test_dequantize_then_matmul(fmt, group_size, dtype):
    w = packed(fmt, K, N, group_size)
    got, want = w4a16.dequantize(w, dtype).T.float().cpu(), dequantize(w).to(dtype).float().cpu()
    if dtype == torch.float16 or DEVICE == "cuda":
        assert torch.equal(got, want)
    else:  # the interpreter's fp32 -> bf16 cast is not round-to-nearest-even: allow its one ulp
        torch.testing.assert_close(got, want, rtol=2**-7, atol=0)
    x = torch.randn(9, K, device=DEVICE).to(dtype)
    check(w4a16.dequant_mm(x, w), x, w)


@pytest.mark.parametrize("m", [1, 3, 20])
def test_dispatch_takes_any_m_and_leading_dims(m):
    w = packed("gptq-act-order", 256, 40, 64)
    x = torch.randn(m, 256, device=DEVICE).half()
    check(w4a16_dispatch.w4a16_linear(x, w), x, w)
    assert w4a16_dispatch.w4a16_linear(x.view(1, m, 256), w).shape == (1, m, 40)


def test_fp32_activations_are_exact_products():
    w = packed("awq", 128, 32, 32)
    x = torch.randn(2, 128, device=DEVICE)
    torch.testing.assert_close(w4a16_gemv.gemv(x, w), linear_ref(x, w), rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_value_errors():
    w = packed("gptq-asym", 128, 16, 32)
    with pytest.raises(ValueError, match="input features"):
        w4a16_gemv.gemv(torch.randn(2, 64, device=DEVICE).half(), w)
    with pytest.raises(ValueError, match="contiguous rows"):
        w4a16_gemv.gemv(torch.randn(128, 2, device=DEVICE).half().T, w)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        w4a16_gemv.gemv(torch.zeros(2, 128, dtype=torch.int32, device=DEVICE), w)
    with pytest.raises(ValueError, match="bias must be"):
        w4a16_gemv.gemv(torch.randn(2, 128, device=DEVICE).half(), w, torch.zeros(3, device=DEVICE).half())
    with pytest.raises(ValueError, match="block_m and block_n"):
        w4a16_tiled.tiled(torch.randn(2, 128, device=DEVICE).half(), w, None, w4a16.Config("tiled", 8, 64, 64))
    with pytest.raises(ValueError, match="block_k"):
        w4a16_tiled.tiled(torch.randn(2, 128, device=DEVICE).half(), w, None, w4a16.Config("tiled", 16, 64, 48))
    with pytest.raises(ValueError, match="whole 32-channel"):
        w4a16_tiled.tiled(torch.randn(2, 128, device=DEVICE).half(), w, None, w4a16.Config("tiled", 16, 64, 16))


def test_candidates_fit_the_shape():
    w = packed("gptq-asym", 256, 16, 128)
    for m in (1, 3, 16, 20, 64, 256, 2048):
        cands = w4a16_dispatch.candidates(m, w)
        assert cands and all(c.kind == "dense" or 256 // c.split_k >= c.block_k for c in cands)
        bf16 = w4a16_dispatch.candidates(m, w, torch.bfloat16)
        assert (m <= 8) == any(c.kind == "gemv_h2" for c in cands) == any(c.kind == "gemv" for c in bf16)
        assert not any(c.kind == "gemv" for c in cands)  # fp16 x: gemv_h2 in its place
        assert {c.block_m for c in cands if c.kind == "gemv_rows"} == ({min(triton.next_power_of_2(m), 8)}
                                                                      if 2 <= m <= 16 else set())
        assert not any(c.kind in ("gemv_h2", "gemv_rows") for c in bf16)
        assert (m >= 128) == any(c.kind == "dense" for c in cands)
        assert all(c.block_m <= max(64, m) for c in cands if c.kind == "tiled")
        assert {c.kind for c in cands} <= set(w4a16.PATHS)


# -- on the GPU: real shapes, tuning, CUDA graphs ----------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("fmt, dtype, every", [("awq", torch.float16, 2), ("gptq-act-order", torch.bfloat16, 5)])
def test_the_tuned_candidates_on_a_llama_shape(fmt, dtype, every):
    """A sample of the candidates the tuner may pick (each one is a compile; the tuner also checks each
    candidate's output against the dequantize + cuBLAS path before it may win)."""
    w = packed(fmt, 4096, 1000, 128)
    for m in (1, 7, 64, 300):
        x = torch.randn(m, 4096, device=DEVICE).to(dtype)
        for cfg in w4a16_dispatch.candidates(m, w, dtype)[::every]:
            try:
                out = w4a16.PATHS[cfg.kind](x, w, None, cfg)
            except triton.runtime.errors.OutOfResources:
                continue  # too much shared memory for this GPU: the tuner drops it the same way
            check(out, x, w)


@pytest.mark.gpu
def test_any_row_count_reuses_the_compiled_kernels(compiled_variants):
    """Start-up tunes powers of two; a step's M of another kind (1, a multiple of 16, neither) must reuse
    those kernels rather than compile new ones mid-run."""
    w = packed("gptq-asym", 1024, 512, 128)
    kernels = {"tiled": [w4a16_tiled._tiled_kernel, w4a16_common._splitk_reduce_kernel],
               "gemv_h2": [w4a16_gemv_h2._gemv_h2_kernel], "gemv": [w4a16_gemv._gemv_kernel]}
    for cfg in (w4a16.Config("tiled", 16, 64, 128, 2, 4, 3), w4a16.Config("gemv_h2", 1, 64, 128, 2, 4, 1),
                w4a16.Config("gemv", 1, 64, 128, 2, 4, 2)):
        counts = []
        for m in (16, 1, 13, 5, 32):
            x = torch.randn(m, 1024, device=DEVICE).half()
            check(w4a16.PATHS[cfg.kind](x, w, None, cfg), x, w)
            counts.append([compiled_variants(k) for k in kernels[cfg.kind]])
        assert counts == [counts[0]] * len(counts), cfg


@pytest.mark.gpu
def test_tuned_dispatch_is_captured_by_a_cuda_graph(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMCTL_W4A16_CACHE", str(tmp_path / "cache.json"))
    w = packed("gptq-act-order", 1024, 512, 64)
    x = torch.randn(4, 1024, device=DEVICE).half()
    eager = w4a16_dispatch.w4a16_linear(x, w)  # tunes the bucket, outside the capture
    assert (tmp_path / "cache.json").is_file()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w4a16_dispatch.w4a16_linear(x, w)
    x.copy_(torch.randn_like(x))
    graph.replay()
    check(out, x, w)
    assert not torch.equal(out, eager)


@pytest.mark.gpu
def test_pretune_times_every_bucket_once_then_nothing(tmp_path, monkeypatch):
    """pretune covers every power-of-two M bucket up to max_m's for each weight shape and saves them; a
    second pass (or a later call of any M up to max_m) finds them all and times nothing."""
    monkeypatch.setenv("LLMCTL_W4A16_CACHE", str(tmp_path / "cache.json"))
    monkeypatch.setattr(w4a16_dispatch, "_tuned", {})
    a, b = packed("gptq-asym", 1024, 512, 128), packed("awq", 512, 256, 64)
    assert w4a16_dispatch.pretune([a, b, a], torch.float16, 40) == 2 * 7  # buckets 1, 2, 4 ... 64
    assert (tmp_path / "cache.json").is_file()

    def no_tuning(*args):
        raise AssertionError("a pretuned bucket was tuned again")

    monkeypatch.setattr(w4a16_dispatch, "tune", no_tuning)
    assert w4a16_dispatch.pretune([a, b], torch.float16, 64) == 0
    for m in (1, 3, 17, 40):
        x = torch.randn(m, 1024, device=DEVICE).half()
        check(w4a16_dispatch.w4a16_linear(x, a), x, a)
