"""The fp8 KV cache's kernels: the store writes torch's e4m3 bits, attention over fp8 codes equals its twin
and, through the twin, dense attention over the dequantized keys and values.

On CUDA the kernels run compiled; without it, under Triton's interpreter (set before triton is imported).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from test_kernels import dense_attention, make_batch  # noqa: E402  (the paged batch and reference they test with)

from llmctl.runtime.kernels.kv_store import FP8, rope_store_kv, rope_store_kv_ref, to_cache  # noqa: E402
from llmctl.runtime.kernels.paged_attention import paged_attention, paged_attention_ref  # noqa: E402
from llmctl.runtime.layers.rotary import RotaryEmbedding  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def all_e4m3_values() -> torch.Tensor:
    """Every finite e4m3fn value, ascending."""
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8).float()
    return values[values.isfinite()].unique()


def store_values(values: torch.Tensor, v_scale: float) -> torch.Tensor:
    """`values` sent through the store kernel's value path into an fp8 cache; returns the cache's codes."""
    head_dim, n = 64, values.numel()
    tokens = -(-n // head_dim)
    v = torch.zeros(tokens * head_dim)
    v[:n] = values
    v = v.view(tokens, 1, head_dim).to(DEVICE)
    q, k = torch.zeros(tokens, 1, head_dim, device=DEVICE), torch.zeros(tokens, 1, head_dim, device=DEVICE)
    rope = RotaryEmbedding(head_dim, 16, 10000.0, None, device=DEVICE)
    caches = [torch.zeros(tokens, 1, 1, head_dim, dtype=FP8, device=DEVICE) for _ in range(2)]
    slots = torch.arange(tokens, device=DEVICE)
    rope_store_kv(torch.zeros(tokens, dtype=torch.long, device=DEVICE), q, k, v, rope.cos, rope.sin, *caches, slots,
                  v_scale=v_scale)
    return caches[1].flatten()[:n].cpu()


def test_store_rounds_every_value_as_torch_casts():
    grid = all_e4m3_values()
    midpoints = (grid[1:] + grid[:-1]) / 2  # ties: round to the even code
    near = torch.cat([midpoints * (1 + 1e-6), midpoints * (1 - 1e-6)])
    rand = torch.randn(20000, generator=torch.Generator().manual_seed(0)) * torch.logspace(-4, 3, 20000)
    values = torch.cat([grid, midpoints, near, rand, torch.tensor([500.0, -1e6, 1e-12, -0.0])])
    got = store_values(values, 1.0)
    want = to_cache(values, FP8, 1.0)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert got.float().abs().max() == 448.0, "out-of-range values saturate, never NaN"


def test_store_divides_by_the_scale():
    values = torch.linspace(-3, 3, 257)
    got = store_values(values, 0.25)
    assert torch.equal(got.view(torch.uint8), to_cache(values, FP8, 4.0).view(torch.uint8))
    # half a step of e4m3's 3 mantissa bits, relative (or of the subnormals' 2^-9, absolute)
    assert ((got.float() * 0.25 - values).abs() <= values.abs() / 16 + 2**-10 * 0.25).all()


@pytest.mark.parametrize("dtype,heads,kv_heads,head_dim", [(torch.float32, 4, 2, 32), (torch.float16, 6, 3, 64),
                                                           (torch.float16, 8, 1, 128)])
def test_fp8_store_equals_twin(dtype, heads, kv_heads, head_dim):
    gen = torch.Generator().manual_seed(3)
    num_blocks, block_size, tokens = 5, 16, 37
    rope = RotaryEmbedding(head_dim, 2048, 10000.0, None, device=DEVICE)
    positions = torch.randint(0, 2048, (tokens,), generator=gen).to(DEVICE)
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen) * 4).to(dtype).to(DEVICE)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens].to(DEVICE)
    base = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(FP8).to(DEVICE)
    caches = [base.clone() for _ in range(4)]
    q_ref_in = q.clone()
    rope_store_kv(positions, q, k, v, rope.cos, rope.sin, caches[0], caches[1], slots, k_scale=0.05, v_scale=3.0)
    q_ref = rope_store_kv_ref(positions, q_ref_in, k, v, rope.cos, rope.sin, caches[2], caches[3], slots,
                              k_scale=0.05, v_scale=3.0)
    assert torch.equal(q, q_ref)
    for got, want in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots.long().cpu()] = False
    flat = caches[0].view(-1, kv_heads, head_dim).view(torch.uint8).cpu()
    assert torch.equal(flat[untouched], base.view(-1, kv_heads, head_dim).view(torch.uint8).cpu()[untouched])


def fp8_batch(rows, heads, kv_heads, head_dim, block_size, dtype, k_scale, v_scale, seed):
    """test_kernels' paged batch with its caches in fp8 codes (the unowned slots' NaN stays NaN, so a stray
    read shows); also the dequantized per-sequence keys and values."""
    args, keys, values = make_batch(rows, heads, kv_heads, head_dim, block_size, torch.float32, seed)
    args[0] = args[0].to(dtype)
    args[3] = torch.empty_like(args[0])
    args[1], args[2] = to_cache(args[1], FP8, 1 / k_scale), to_cache(args[2], FP8, 1 / v_scale)
    keys = [to_cache(k, FP8, 1 / k_scale).float() * k_scale for k in keys]
    values = [to_cache(v, FP8, 1 / v_scale).float() * v_scale for v in values]
    return args, keys, values


def rel_err(a, b):
    return ((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm()).item()


@pytest.mark.parametrize("rows,splits", [([(1, 37), (45, 45), (0, 23), (13, 50), (1, 1), (20, 84)], None),
                                         ([(1, 37), (1, 130), (1, 97)], 4)], ids=["mixed", "decode-splits"])
@pytest.mark.parametrize("dtype,heads,kv_heads,head_dim", [(torch.float32, 4, 2, 32), (torch.float16, 8, 2, 64)])
def test_attention_over_fp8_cache(rows, splits, dtype, heads, kv_heads, head_dim):
    k_scale, v_scale = 0.02, 0.5
    args, keys, values = fp8_batch(rows, heads, kv_heads, head_dim, 16, dtype, k_scale, v_scale, seed=7)
    scale, max_q, max_s = head_dim**-0.5, max(q for q, _ in rows), max(s for _, s in rows)
    out = paged_attention(*args, scale, max_q, max_s, num_kv_splits=splits, k_scale=k_scale, v_scale=v_scale).clone()
    ref = paged_attention_ref(*args, scale, max_q, max_s, k_scale=k_scale, v_scale=v_scale)
    assert not out.isnan().any() and not ref.isnan().any()
    want = dense_attention(args[0].cpu(), keys, values, args[4].cpu(), scale)
    assert rel_err(ref, want) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert rel_err(out, ref) < (1e-4 if dtype == torch.float32 else 1e-2)


def test_scales_are_checked():
    args, _, _ = fp8_batch([(1, 5)], 2, 2, 32, 16, torch.float32, 1.0, 1.0, seed=1)
    with pytest.raises(ValueError, match="k_scale and v_scale must be positive and finite, got 0.0"):
        paged_attention_ref(*args, 0.1, 1, 5, k_scale=0.0)
    fp32_cache = [args[0], args[1].float(), args[2].float(), *args[3:]]
    with pytest.raises(ValueError, match="apply to an fp8 cache only"):
        paged_attention_ref(*fp32_cache, 0.1, 1, 5, v_scale=2.0)


def test_an_fp8_decode_tile_is_read_as_words_on_sm90(sass_loop):
    """Static, from the sm_90 SASS: an fp8 cache's decode tile costs about an fp16 tile's instructions, with
    no byte-wide shared-memory reads (loaded as fp8, Triton read V into its MMA operand a byte at a time: 128
    LDS.U8 and 857 instructions a 128-key tile against fp16's 467)."""
    step = ["attention", "--m", "256", "--k", "1024"]
    fp16 = sass_loop(*step)
    fp8 = sass_loop(*step, "--cache", "float8_e4m3fn")
    assert not any(op.startswith("LDS.U8") for op in fp8["ops"]), fp8
    assert fp8["instructions"] < 1.3 * fp16["instructions"], (fp16, fp8)
