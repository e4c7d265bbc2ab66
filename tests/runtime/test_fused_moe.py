"""The fused-MoE kernels equal their torch twin (GPU, or Triton's interpreter), and the twin equals the
definition token by token."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llmctl.runtime.kernels import fused_moe, fused_moe_tune  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def experts(num: int, hidden: int, inter: int, dtype, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    w13 = torch.randn(num, 2 * inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(num, hidden, inter, generator=g) / inter**0.5
    return w13.to(DEVICE, dtype), w2.to(DEVICE, dtype)


def routed(tokens: int, num: int, top_k: int, hidden: int, dtype, seed: int = 1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(DEVICE, dtype)
    weights, ids = torch.softmax(torch.randn(tokens, num, generator=g), -1).topk(top_k, dim=-1)
    return x, weights.to(DEVICE), ids.to(DEVICE)


def test_the_twin_is_the_definition():
    w13, w2 = experts(6, 64, 48, torch.float64)
    x, weights, ids = routed(9, 6, 3, 64, torch.float64)
    want = torch.zeros_like(x)
    for t in range(9):
        for j in range(3):
            gate, up = (w13[ids[t, j]] @ x[t]).chunk(2)
            want[t] += weights[t, j].double() * (w2[ids[t, j]] @ (F.silu(gate) * up))
    torch.testing.assert_close(fused_moe.fused_moe_ref(x, w13, w2, weights.double(), ids), want)


@pytest.mark.parametrize("tokens,num,top_k,block_m", [(1, 8, 2, 16), (5, 4, 4, 16), (70, 16, 3, 32), (3, 128, 8, 16)])
def test_align_sorts_rows_by_expert_in_padded_blocks(tokens, num, top_k, block_m):
    _, _, ids = routed(tokens, num, top_k, 8, torch.float32)
    rows, block_expert = fused_moe.align(ids, num, block_m)
    n = tokens * top_k
    flat = ids.flatten().cpu()
    rows, block_expert = rows.cpu(), block_expert.cpu()
    assert sorted(r for r in rows.tolist() if r < n) == list(range(n)), "every row exactly once"
    used = int((block_expert < num).sum())
    assert (block_expert[:used] < num).all() and (block_expert[used:] == num).all(), "used blocks come first"
    assert block_expert[:used].tolist() == sorted(block_expert[:used].tolist())
    assert (rows[used * block_m:] == n).all()
    for b in range(used):
        block = rows[b * block_m:(b + 1) * block_m]
        real = block[block < n]
        assert len(real) > 0 and (flat[real] == block_expert[b]).all(), f"block {b} holds another expert's rows"
    assert used == sum(-(-int((flat == e).sum()) // block_m) for e in range(num))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,num,top_k,hidden,inter", [
    (1, 8, 2, 128, 96),     # one decode token, an intermediate size off the block
    (13, 4, 2, 64, 128),    # several tokens per expert
    (40, 16, 4, 96, 64),    # many experts, uneven counts, a hidden size off the block
])
def test_triton_equals_the_twin(dtype, tokens, num, top_k, hidden, inter):
    w13, w2 = experts(num, hidden, inter, dtype)
    x, weights, ids = routed(tokens, num, top_k, hidden, dtype)
    want = fused_moe.fused_moe_ref(x, w13, w2, weights, ids)
    got = fused_moe.fused_moe(x, w13, w2, weights, ids)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("block_m", [16, 32])
def test_every_block_size_gives_the_same_sums(block_m):
    w13, w2 = experts(8, 64, 64, torch.float32)
    x, weights, ids = routed(21, 8, 2, 64, torch.float32)
    cfg = (block_m, (64, 64, 4, 1), (64, 64, 4, 1))
    torch.testing.assert_close(fused_moe.fused_moe(x, w13, w2, weights, ids, cfg),
                               fused_moe.fused_moe_ref(x, w13, w2, weights, ids), rtol=1e-4, atol=1e-4)


def test_no_tokens_and_bad_shapes():
    w13, w2 = experts(4, 64, 32, torch.float32)
    x, weights, ids = routed(0, 4, 2, 64, torch.float32)
    assert fused_moe.fused_moe(x, w13, w2, weights, ids).shape == (0, 64)
    x, weights, ids = routed(3, 4, 2, 64, torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        fused_moe.fused_moe(x[:, :32].contiguous(), w13, w2, weights, ids)
    with pytest.raises(ValueError, match="top_k"):
        fused_moe.fused_moe(x, w13, w2, weights[:, :1], ids)


@pytest.mark.skipif(DEVICE != "cuda", reason="tuning times kernels on a GPU")
def test_tuning_picks_a_configuration_that_agrees():
    w13, w2 = experts(16, 256, 128, torch.float16)
    x, weights, ids = routed(32, 16, 2, 256, torch.float16)
    cfg = fused_moe_tune.tune(x, w13, w2, weights, ids)
    torch.testing.assert_close(fused_moe.fused_moe(x, w13, w2, weights, ids, cfg),
                               fused_moe.fused_moe_ref(x, w13, w2, weights, ids), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs")
def test_the_triton_path_is_capturable_in_a_cuda_graph():
    w13, w2 = experts(16, 256, 128, torch.float16)
    x, weights, ids = routed(8, 16, 2, 256, torch.float16)
    fused_moe.fused_moe(x, w13, w2, weights, ids)  # tunes this bucket outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe.fused_moe(x, w13, w2, weights, ids)
    x2, weights2, ids2 = routed(8, 16, 2, 256, torch.float16, seed=5)
    x.copy_(x2), weights.copy_(weights2), ids.copy_(ids2)
    graph.replay()
    torch.testing.assert_close(out, fused_moe.fused_moe_ref(x, w13, w2, weights, ids), rtol=2e-2, atol=2e-2)


def int4_experts(num: int, n: int, k: int, group: int, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    codes = torch.randint(0, 16, (num, n, k), generator=g)
    scales = torch.rand(num, n, k // group, generator=g) * 0.02 + 0.005
    zeros = torch.randint(0, 16, (num, n, k // group), generator=g)
    return codes, scales, zeros


def test_int4_experts_pack_and_dequantize_as_defined():
    codes, scales, zeros = int4_experts(3, 24, 64, 32)
    packed = fused_moe.Int4Experts.pack(codes, scales, zeros, 32)
    assert packed.shape == (3, 24, 64) and packed.codes.shape == (3, 8, 24)
    want = scales.repeat_interleave(32, dim=2) * (codes - zeros.repeat_interleave(32, dim=2)).float()
    torch.testing.assert_close(packed.dequantize(torch.float32), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiple of 8 and of the group size"):
        fused_moe.Int4Experts.pack(codes[:, :, :60], scales, zeros, 32)


@pytest.mark.parametrize("dtype", DTYPES[1:] if DEVICE == "cuda" else DTYPES)
@pytest.mark.parametrize("tokens,num,top_k,hidden,inter,group", [(1, 8, 2, 128, 96, 32), (40, 16, 4, 256, 64, 64)])
def test_int4_triton_equals_the_twin(dtype, tokens, num, top_k, hidden, inter, group):
    """The int4 path dequantizes inside the kernels; the twin dequantizes first: same weights, same sums."""
    w13 = fused_moe.Int4Experts.pack(*int4_experts(num, 2 * inter, hidden, group, 1), group)
    w2 = fused_moe.Int4Experts.pack(*int4_experts(num, hidden, inter, group, 2), group)
    w13 = fused_moe.Int4Experts(w13.codes.to(DEVICE), w13.scales.to(DEVICE), w13.zeros.to(DEVICE), group)
    w2 = fused_moe.Int4Experts(w2.codes.to(DEVICE), w2.scales.to(DEVICE), w2.zeros.to(DEVICE), group)
    x, weights, ids = routed(tokens, num, top_k, hidden, dtype)
    want = fused_moe.fused_moe_ref(x, w13, w2, weights, ids)
    got = fused_moe.fused_moe(x, w13, w2, weights, ids)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2 * want.abs().max().item())
    torch.testing.assert_close(got, want, **tol)


def test_int4_tiles_stay_inside_a_group_and_groups_tune_apart():
    """No timed int4 tile fits a 16-channel group: the heuristic's does; two group sizes of one shape are
    two tunings (a tile tuned for 128 may not fit 32)."""
    assert all(not tiles for _, tiles in fused_moe_tune.candidates(64, 8, group=16))
    assert all(32 % t[1] == 0 for _, tiles in fused_moe_tune.candidates(64, 8, group=32) for t in tiles)
    _, up, down = fused_moe_tune.heuristic(64, 8, False, group=16)
    assert up[1] == down[1] == 16
    codes, scales, zeros = int4_experts(2, 32, 128, 32)
    a = fused_moe.Int4Experts.pack(codes, scales, zeros, 32)
    b = fused_moe.Int4Experts.pack(codes, scales[:, :, :1], zeros[:, :, :1], 128)
    x = torch.zeros(4, 128)
    assert fused_moe_tune._key(x, a, 2) != fused_moe_tune._key(x, b, 2)


def test_pretune_compiles_every_tile_it_will_time_before_timing(monkeypatch):
    """Each untuned bucket's candidate tiles go to compiling.in_parallel (as up and down tiles) before any
    bucket is timed; a bucket already tuned is neither compiled nor timed."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    w13, w2 = torch.randn(4, 64, 32), torch.randn(4, 32, 32)
    layer = SimpleNamespace(w13=w13, w2=w2, top_k=2)
    events = []
    monkeypatch.setattr(fused_moe_tune, "_tuned", {})
    monkeypatch.setattr(fused_moe_tune, "in_parallel", lambda launches: events.append(("compile", len(list(launches)))))
    monkeypatch.setattr(fused_moe_tune, "tune", lambda x, *rest: events.append(("time", x.shape[0])))
    fused_moe_tune._tuned[fused_moe_tune._key(torch.zeros(2, 32), w13, 2)] = (16, (64, 64, 4, 3), (64, 64, 4, 3))
    assert fused_moe_tune.pretune([layer, layer], torch.float32, 4) == 2  # buckets 1 and 4; 2 is tuned
    want = sum(len(tiles) for m in (1, 4) for _, tiles in fused_moe_tune.candidates(m * 2, 4))
    assert events == [("compile", want), ("time", 1), ("time", 4)]
