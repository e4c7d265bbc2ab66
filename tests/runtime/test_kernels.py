"""Each Triton kernel equals its torch twin on fresh random inputs; the twins equal a float64 dense reference.

On CUDA the kernels run compiled; without it, under Triton's interpreter (set before triton is imported).
"""

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from llmctl.runtime.kernels import paged_attention as pa  # noqa: E402
from llmctl.runtime.kernels.kv_store import rope_ref, rope_store_kv, rope_store_kv_ref  # noqa: E402
from llmctl.runtime.kernels.paged_attention import paged_attention, paged_attention_ref  # noqa: E402
from llmctl.runtime.layers.rotary import RotaryEmbedding  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}

# (dtype, num_heads, num_kv_heads, head_dim, block_size): MHA and GQA (groups 2, 3, 4, 8), every head_dim and page size.
SHAPES = [
    (torch.float32, 4, 4, 32, 16),
    (torch.float32, 8, 2, 64, 32),
    (torch.float32, 4, 1, 128, 16),
    (torch.float16, 2, 2, 128, 32),
    (torch.float16, 6, 2, 64, 16),
    (torch.float16, 16, 2, 32, 32),
    (torch.bfloat16, 8, 2, 128, 16),
]
# (q_len, seq_len) rows: decode, prefill from scratch, empty row, prefill on a cached prefix, decode of a
# 1-token sequence; (3, 65) puts a first query at position 62 = BLOCK_N - 2, the edge of the unmasked key range.
MIXED = [(1, 37), (45, 45), (0, 23), (13, 50), (1, 1), (20, 84), (3, 65)]
DECODE = [(1, 37), (1, 130), (0, 23), (1, 1), (1, 64), (1, 97)]


def shape_id(shape):
    dtype, hq, hkv, d, bs = shape
    return f"{str(dtype).split('.')[-1]}-hq{hq}-hkv{hkv}-d{d}-bs{bs}"


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_batch(rows, num_heads, num_kv_heads, head_dim, block_size, dtype, seed):
    """Random paged batch; cache slots that no sequence owns hold NaN so any stray read shows."""
    gen = torch.Generator().manual_seed(seed)
    q_lens = [q for q, _ in rows]
    seq_lens = [s for _, s in rows]
    blocks_per_seq = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 2
    ids = torch.randperm(num_blocks, generator=gen).tolist()
    scratch = ids.pop()
    block_tables = torch.full((len(rows), max(blocks_per_seq) + 1), scratch, dtype=torch.int32)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(cache_shape, float("nan"), dtype=dtype)
    v_cache = torch.full(cache_shape, float("nan"), dtype=dtype)
    keys, values = [], []  # per sequence: [seq_len, num_kv_heads, head_dim], contiguous
    for b, seq_len in enumerate(seq_lens):
        k = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        for i in range(blocks_per_seq[b]):
            block = ids.pop()
            block_tables[b, i] = block
            n = min(block_size, seq_len - i * block_size)
            k_cache[block, :n] = k[i * block_size : i * block_size + n]
            v_cache[block, :n] = v[i * block_size : i * block_size + n]
        keys.append(k)
        values.append(v)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype)
    qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    args = [q, k_cache, v_cache, None, qsl, torch.tensor(seq_lens, dtype=torch.int32), block_tables]
    return [t if t is None else t.to(DEVICE) for t in args], keys, values


def dense_attention(q, keys, values, qsl, scale, window=None, softcap=None):
    """float64 causal attention over contiguous per-sequence K/V, heads expanded explicitly."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    group = q.shape[1] // keys[0].shape[1]
    for b, (k, v) in enumerate(zip(keys, values, strict=True)):
        start, end = int(qsl[b]), int(qsl[b + 1])
        seq_len, q_len = k.shape[0], end - start
        # k, v: [num_heads, seq_len, head_dim]; s: [num_heads, q_len, seq_len]
        k = k.double().repeat_interleave(group, dim=1).transpose(0, 1)
        v = v.double().repeat_interleave(group, dim=1).transpose(0, 1)
        s = q[start:end].double().transpose(0, 1) @ k.transpose(1, 2) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        positions = torch.arange(seq_len - q_len, seq_len)[:, None]
        hidden = torch.arange(seq_len)[None, :] > positions
        if window:
            hidden |= torch.arange(seq_len)[None, :] <= positions - window
        out[start:end] = (s.masked_fill(hidden, float("-inf")).softmax(-1) @ v).transpose(0, 1)
    return out


def free_outside_windows(args, rows, block_size, window):
    """Point every block wholly before a sequence's first query's window at an unowned (NaN) block, as the
    block manager frees them: neither kernel nor twin may read them."""
    block_tables = args[6]
    scratch = int(block_tables[0, -1])
    for b, (q_len, seq_len) in enumerate(rows):
        first_needed = max(seq_len - q_len - window + 1, 0) // block_size
        block_tables[b, :first_needed] = scratch


def check_attention(shape, rows, seed, max_query_len=None, window=None, softcap=None, scale=None, **kwargs):
    dtype, num_heads, num_kv_heads, head_dim, block_size = shape
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("bfloat16 needs the GPU: the interpreter computes through numpy")
    args, keys, values = make_batch(rows, num_heads, num_kv_heads, head_dim, block_size, dtype, seed)
    if window:
        free_outside_windows(args, rows, block_size, window)
    q, qsl = args[0], args[4]
    scale = scale or head_dim**-0.5
    max_query_len = max_query_len or max(q for q, _ in rows)
    max_seq_len = max(s for _, s in rows)
    args[3] = torch.full_like(q, float("nan"))
    out = paged_attention(*args, scale, max_query_len, max_seq_len, window=window, softcap=softcap, **kwargs)
    args[3] = torch.full_like(q, float("nan"))
    ref = paged_attention_ref(*args, scale, max_query_len, max_seq_len, window=window, softcap=softcap)
    assert not out.isnan().any(), "kernel left output unwritten"
    assert not ref.isnan().any(), "twin left output unwritten"
    dense = dense_attention(q.cpu(), keys, values, qsl.cpu(), scale, window, softcap)
    # the twin is exact up to fp32 arithmetic and the final rounding to dtype
    assert rel_err(ref.cpu(), dense) < (1e-5 if dtype == torch.float32 else TOL[dtype])
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_attention_mixed_batch(shape):
    check_attention(shape, MIXED, seed=1)


# Windows shorter than the prompts (a tile straddling a window start), one that covers everything, and
# decodes whose window starts inside a split; blocks before every window are freed (NaN) in the batch.
@pytest.mark.parametrize("window", [1, 7, 16, 40, 1000])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[4]], ids=shape_id)
def test_attention_sliding_window(shape, window):
    check_attention(shape, MIXED, seed=2, window=window)
    check_attention(shape, DECODE, seed=3, window=window, num_kv_splits=4)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[5]], ids=shape_id)
def test_attention_soft_capping_and_a_given_scale(shape):
    # Gemma 2: scores capped at 50 after a scale of query_pre_attn_scalar ** -0.5, here a sharp one so the
    # cap bites; with a window too (its sliding layers).
    head_dim = shape[3]
    check_attention(shape, MIXED, seed=4, softcap=5.0, scale=4 * head_dim**-0.5)
    check_attention(shape, MIXED, seed=5, softcap=5.0, window=20)
    check_attention(shape, DECODE, seed=6, softcap=5.0, num_kv_splits=2)


def test_window_and_cap_are_checked():
    args, _, _ = make_batch([(1, 5)], 2, 2, 32, 16, torch.float32, 0)
    args[3] = torch.empty_like(args[0])
    for bad in ({"window": 0}, {"window": 2.5}, {"softcap": 0.0}, {"softcap": -1.0}):
        with pytest.raises(ValueError, match="window|softcap"):
            paged_attention_ref(*args, 1.0, 1, 5, **bad)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("splits", [1, 5] + ([None] if DEVICE == "cuda" else []))  # None: SM-count heuristic
def test_attention_decode(shape, splits):
    check_attention(shape, DECODE, seed=2, num_kv_splits=splits)


def test_attention_decode_rows_through_prefill_kernel():
    # max_query_len is an upper bound: an all-decode batch may still take the tiled path.
    check_attention(SHAPES[4], DECODE, seed=3, max_query_len=8)


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("splits", [None, 3])
def test_attention_leading_decodes_apart(shape, splits):
    # A prefill chunk beside running sequences: the three leading one-query rows take the decode launch.
    rows = [(1, 37), (1, 130), (1, 1), (45, 45), (0, 23), (13, 50), (1, 64)]
    check_attention(shape, rows, seed=9, num_decodes=3, num_kv_splits=splits)


def test_attention_long_chunk_on_prefix():
    # Several query tiles in one sequence, with and without a cached prefix, pages of 16.
    check_attention((torch.float16, 4, 2, 64, 16), [(300, 300), (150, 400)], seed=4)


def fused_qkv(tokens, heads, kv_heads, head_dim, dtype, gen):
    """q, k, v as views into one fused projection (token stride larger than each part), as the model has them."""
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype).to(DEVICE)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype,heads,kv_heads,head_dim", [(torch.float32, 4, 2, 32), (torch.float16, 32, 32, 128),
                                                           (torch.float16, 6, 3, 64), (torch.bfloat16, 28, 4, 128),
                                                           (torch.float16, 8, 1, 256)])
def test_rope_store_kv(slot_dtype, dtype, heads, kv_heads, head_dim):
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("bfloat16 needs the GPU: the interpreter computes through numpy")
    gen = torch.Generator().manual_seed(5)
    num_blocks, block_size, num_tokens = 6, 16, 40
    rope = RotaryEmbedding(head_dim, 4096, 10000.0, None, device=DEVICE)
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen).to(DEVICE)
    q, key, value = fused_qkv(num_tokens, heads, kv_heads, head_dim, dtype, gen)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(slot_dtype).to(DEVICE)
    cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    caches = [cache.clone() for _ in range(4)]
    key_before, q_ref_in = key.clone(), q.clone()
    q_out = rope_store_kv(positions, q, key, value, rope.cos, rope.sin, caches[0], caches[1], slots)
    q_ref = rope_store_kv_ref(positions, q_ref_in, key, value, rope.cos, rope.sin, caches[2], caches[3], slots)
    assert q_out.data_ptr() == q.data_ptr(), "q is rotated in place"
    assert torch.equal(key, key_before)
    assert torch.equal(q, q_ref), "the rotation rounds as its twin (and transformers) does"
    assert torch.equal(caches[0], caches[2])
    assert torch.equal(caches[1], caches[3]), "values are copied bit for bit"
    flat_k, flat_v = (c.view(-1, kv_heads, head_dim) for c in caches[2:])
    assert torch.equal(flat_v[slots.long()], value)
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    untouched[slots.long()] = False
    for flat, c in ((flat_k, caches[0]), (flat_v, caches[1])):
        assert torch.equal(c.view(-1, kv_heads, head_dim)[untouched], cache.view(-1, kv_heads, head_dim)[untouched])
        assert torch.equal(flat[untouched], cache.view(-1, kv_heads, head_dim)[untouched])
    empty = rope_store_kv(positions[:0], q[:0], key[:0], value[:0], rope.cos, rope.sin, caches[0], caches[1], slots[:0])
    assert empty.shape == (0, heads, head_dim) and torch.equal(caches[0], caches[2])


def test_rope_twin_is_transformers_rotation():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(11)
    rope = RotaryEmbedding(64, 512, 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 128})
    positions = torch.randint(0, 512, (9,), generator=gen)
    q, k = (torch.randn(9, h, 64, generator=gen).half() for h in (4, 2))
    cos, sin = rope.cos[positions].half(), rope.sin[positions].half()
    # transformers' layout: [batch, heads, tokens, head_dim], cos/sin [batch, tokens, head_dim]
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    assert torch.equal(rope_ref(positions, q, rope.cos, rope.sin), want_q[0].transpose(0, 1))
    assert torch.equal(rope_ref(positions, k, rope.cos, rope.sin), want_k[0].transpose(0, 1))


def test_validation_names_bad_values():
    args, _, _ = make_batch(MIXED, 4, 2, 32, 16, torch.float32, seed=6)
    args[3] = torch.empty_like(args[0])
    with pytest.raises(ValueError, match="int32"):
        paged_attention(*args[:5], args[5].long(), args[6], 0.1, 45, 84)
    with pytest.raises(ValueError, match="dtype"):
        paged_attention(*args[:3], args[3].half(), *args[4:], 0.1, 45, 84)
    with pytest.raises(ValueError, match="contiguous"):
        strided = args[1].transpose(0, 1).contiguous().transpose(0, 1)
        paged_attention(args[0], strided, *args[2:], 0.1, 45, 84)
    q = torch.empty(args[0].shape[0], 4, 24, device=DEVICE)
    cache = torch.empty(*args[1].shape[:3], 24, device=DEVICE)
    with pytest.raises(ValueError, match="power of two"):
        paged_attention(q, cache, cache, torch.empty_like(q), *args[4:], 0.1, 45, 84)
    with pytest.raises(ValueError, match="num_decodes"):
        paged_attention(*args, 0.1, 45, 84, num_decodes=len(MIXED) + 1)
    key = torch.empty(3, 2, 32, device=DEVICE)
    q, table = torch.empty(3, 4, 32, device=DEVICE), torch.ones(8, 32, device=DEVICE)
    pos = torch.zeros(3, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="slot_mapping"):
        rope_store_kv(pos, q, key, key, table, table, args[1], args[2], torch.zeros(3, dtype=torch.int16, device=DEVICE))
    with pytest.raises(ValueError, match="positions"):
        rope_store_kv(pos[:2], q, key, key, table, table, args[1], args[2], pos)
    with pytest.raises(ValueError, match="cos and sin"):
        rope_store_kv(pos, q, key, key, table[:, :16], table, args[1], args[2], pos)
    with pytest.raises(ValueError, match="contiguous float tables"):
        rope_store_kv(pos, q, key, key, torch.ones(32, 8, device=DEVICE).t(), table, args[1], args[2], pos)
    with pytest.raises(ValueError, match="packed heads"):
        wide = torch.empty(3, 2, 64, device=DEVICE)[..., :32]
        rope_store_kv(pos, q, wide, wide, table, table, args[1], args[2], pos)


def test_attention_ref_any_head_dim():
    # The torch path serves head sizes the Triton path refuses (e.g. 80).
    args, keys, values = make_batch(MIXED, 4, 2, 80, 16, torch.float32, seed=7)
    args[3] = torch.full_like(args[0], float("nan"))
    ref = paged_attention_ref(*args, 80**-0.5, 45, 84)
    assert rel_err(ref.cpu(), dense_attention(args[0].cpu(), keys, values, args[4].cpu(), 80**-0.5)) < 1e-5


@pytest.mark.gpu
def test_attention_compiles_once_for_any_batch(compiled_variants):
    """Steps bring any number of sequences (1, a multiple of 16, neither) and block tables of any width:
    one compiled kernel serves them all, so no step stops mid-run to compile."""
    shape = (torch.float16, 8, 2, 128, 16)
    counts = []
    # (rows, leading decodes): the first case compiles the tiled and the decode variant a mixed step uses
    # (split counts: 4 in both mixed cases, 3 and 17 sequences of 2 KV heads on keys of at most 250 and 300)
    for rows, decodes in (([(1, 40)] * 3 + [(45, 45), (13, 250)], 3), ([(20, 84)], 0), ([(7, 7)] * 16, 0),
                          ([(1, 90)] * 17 + [(3, 3), (30, 300)], 17), ([(3, 3)] * 3 + [(30, 300)], 0)):
        check_attention(shape, rows, seed=3, num_decodes=decodes)
        counts.append(compiled_variants(pa._paged_attention_kernel))
    assert counts == [counts[0]] * len(counts)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need CUDA")
def test_attention_decode_cuda_graph():
    shape = (torch.float16, 8, 2, 128, 16)
    args, _, _ = make_batch(DECODE, *shape[1:], shape[0], seed=8)
    args[3] = torch.full_like(args[0], float("nan"))
    run = lambda: paged_attention(*args, 0.1, 1, 2048)  # noqa: E731
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    args[5].sub_(torch.tensor([5, 40, 3, 0, 10, 20], dtype=torch.int32, device=DEVICE))  # shorter contexts
    args[3].fill_(float("nan"))
    graph.replay()
    expect = paged_attention_ref(*args[:3], torch.full_like(args[0], float("nan")), *args[4:], 0.1, 1, 2048)
    assert rel_err(args[3], expect) < 1e-2
