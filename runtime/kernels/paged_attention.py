"""Causal attention of this step's queries over each sequence's paged KV cache.

There is no prefill or decode phase: sequence b brings q_len new queries (0, 1 or many) that are the
last q_len of its seq_len tokens, already stored in the cache, and query i attends to keys
0..seq_len - q_len + i. One kernel serves every batch. A program owns one tile of BLOCK_Q queries
of one sequence times all G query heads of one KV head, so the tile's keys and values are read once
per KV group; keys arrive BLOCK_N at a time, gathered page by page through the block table, with an
online softmax. Key tiles that every query in the tile sees skip the causal mask; later ones are
masked; none past the tile's last query are read.

Sliding windows: query p sees keys p - window + 1 .. p, so a tile reads only from its first query's window
start on (keys before it may sit in blocks already freed), every tile masked. Soft-capping (Gemma 2) maps
each score s to cap * tanh(s / cap) before the softmax.

An fp8 cache (e4m3, one scale per layer for keys and one for values) is widened exactly to q's dtype in
registers: decode tiles read it as 32-bit words of four codes, widened where they arrive (`e4m3`; read as
fp8, V reached its MMA operand a byte at a time), prefill tiles as fp8 (their shared-memory path has no
such cost). The key scale is folded into the score scale and the value scale into the output, so the
cache's bytes are all that change.

When every row decodes (max_query_len == 1) a tile is one query, and if batch x kv_heads would leave
SMs idle each sequence's keys are also split across NUM_SPLITS programs ("flash decoding") whose
partial softmax states a second kernel merges. A batch that mixes both (a prefill chunk beside running
sequences) gives its leading one-query sequences their own decode launch: in a 128-query tile, a lone
query would pay for 127 more in matrix work on every key tile.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from llmctl.runtime.kernels.compiling import start
from llmctl.runtime.kernels.e4m3 import widen_rows
from llmctl.runtime.kernels.kv_store import FP8, check_scales

_LOG2E = 1.4426950408889634
_LOG2E_F: tl.constexpr = tl.constexpr(_LOG2E)
_MAX_SPLITS = 32
_SPLIT_KEYS = 64  # the least keys a decode split is given (one 64-key tile)


@triton.jit
def _find_seq(query_start_loc_ptr, first_seq, num_seqs, tile, BLOCK_Q: tl.constexpr):
    # Counting from first_seq (f), sequence b's tiles start at (qsl[b] - qsl[f]) // BLOCK_Q + b - f: room
    # for cdiv(q_len, BLOCK_Q) tiles each, so the grid needs only num_tokens // BLOCK_Q + num_seqs - f
    # programs and no host-side prefix sum. Returns (b, b's first tile).
    base = tl.load(query_start_loc_ptr + first_seq)
    lo = first_seq
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if (tl.load(query_start_loc_ptr + mid) - base) // BLOCK_Q + mid - first_seq <= tile:
            lo = mid + 1
        else:
            hi = mid
    seq = lo - 1
    return seq, (tl.load(query_start_loc_ptr + seq) - base) // BLOCK_Q + seq - first_seq


@triton.jit
def _fp8_tile(cache_ptr, words, key_ok, MASKED: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
              USE_ASM: tl.constexpr):
    """[BLOCK_N, HEAD_DIM] fp16 from an fp8 cache's words ([BLOCK_N, HEAD_DIM / 4] offsets). Loaded as fp8,
    Triton read V a byte at a time into its MMA operand layout: 857 instructions a 128-key decode tile and 201
    registers, against 552 and 133 so (sm_90 SASS, scripts/sass_report.py; fp16 cache: 467 and 126)."""
    ptrs = cache_ptr.to(tl.pointer_type(tl.int32)) + words
    return widen_rows(tl.load(ptrs, mask=key_ok[:, None], other=0) if MASKED else tl.load(ptrs), BLOCK_N, HEAD_DIM,
                      USE_ASM)


@triton.jit
def _attend_tile(
    acc, l_i, m_i, q, q_pos, kv_start, kv_min, kv_hi, k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head,
    qk_scale, window, softcap,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
    MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    FP8_WORDS: tl.constexpr, USE_ASM: tl.constexpr,
):
    keys = kv_start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    key_ok = keys < kv_hi
    if HAS_WINDOW:
        key_ok = key_ok & (keys >= kv_min)  # before every row's window: never read (maybe freed)
    if MASKED:
        block_ids = tl.load(block_table_ptr + keys // PAGE_SIZE, mask=key_ok, other=0)
    else:
        block_ids = tl.load(block_table_ptr + keys // PAGE_SIZE)
    slots = block_ids.to(tl.int64) * PAGE_SIZE + keys % PAGE_SIZE
    rows = slots * NUM_KV_HEADS + kv_head
    if FP8_WORDS:  # an fp8 cache, read as words of four codes (e4m3.py): exact, the scales applied outside
        words = rows[:, None] * (HEAD_DIM // 4) + tl.arange(0, HEAD_DIM // 4)[None, :]
        k = _fp8_tile(k_cache_ptr, words, key_ok, MASKED, BLOCK_N, HEAD_DIM, USE_ASM).to(q.dtype)
        v = _fp8_tile(v_cache_ptr, words, key_ok, MASKED, BLOCK_N, HEAD_DIM, USE_ASM).to(q.dtype)
    else:
        kv_off = rows[:, None] * HEAD_DIM + dims[None, :]
        if MASKED:
            k = tl.load(k_cache_ptr + kv_off, mask=key_ok[:, None], other=0.0)
            v = tl.load(v_cache_ptr + kv_off, mask=key_ok[:, None], other=0.0)
        else:
            k = tl.load(k_cache_ptr + kv_off)
            v = tl.load(v_cache_ptr + kv_off)
        k, v = k.to(q.dtype), v.to(q.dtype)
    # s: [BLOCK_M, BLOCK_N], in log2 units (qk_scale holds log2(e); with a cap, it is applied after)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if HAS_SOFTCAP:
        # cap * tanh(x / cap), tanh as 1 - 2 / (exp(2y) + 1): exact at both ends, no overflow to NaN
        x = s / (_LOG2E_F * softcap)
        s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)) * _LOG2E_F
    if MASKED:
        visible = key_ok[None, :] & (keys[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            visible = visible & (keys[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i, m_new


# The batch's sequence count and block-table width change from step to step; Triton would compile a variant
# for each divisibility class of them (by 16, or equal to 1) the first time a step brought one, a stall of
# every request mid-run. They only index the block table and bound a search: not specializing costs nothing.
@triton.jit(do_not_specialize=["first_seq", "num_seqs", "stride_bt", "window"])
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr, qk_scale, v_scale, first_seq, num_seqs, window, softcap,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    DECODE: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    FP8_WORDS: tl.constexpr, USE_ASM: tl.constexpr,
):
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if DECODE:
        seq = tl.program_id(0)
        q_tile = 0
    else:
        # Reversed so the costliest tiles (last of each sequence, most keys) start first.
        tile = tl.num_programs(0) - 1 - tl.program_id(0)
        seq, seq_tile = _find_seq(query_start_loc_ptr, first_seq, num_seqs, tile, BLOCK_Q)
        q_tile = tile - seq_tile
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    # The tile's BLOCK_M = BLOCK_Q * GROUP_PAD rows: row r is query q_tile * BLOCK_Q + r // GROUP_PAD
    # of head kv_head * GROUP + r % GROUP_PAD (rows past q_len or past GROUP are padding).
    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    q_idx = q_tile * BLOCK_Q + rows // GROUP_PAD
    head = kv_head * GROUP + rows % GROUP_PAD
    row_ok = (q_idx < q_len) & (rows % GROUP_PAD < GROUP)
    q_pos = context_len + q_idx
    dims = tl.arange(0, HEAD_DIM)
    q_off = (q_start + q_idx).to(tl.int64) * stride_qt + head * stride_qh
    # q: [BLOCK_M, HEAD_DIM]
    q = tl.load(q_ptr + q_off[:, None] + dims[None, :], mask=row_ok[:, None], other=0.0)

    # This tile sees keys [kv_min, kv_end) (kv_min: its first query's window start, else 0); split s takes
    # the s-th BLOCK_N-aligned share of them.
    first_pos = context_len + q_tile * BLOCK_Q
    kv_end = tl.minimum(seq_len, first_pos + BLOCK_Q)
    kv_min = 0
    if HAS_WINDOW:
        kv_min = tl.maximum(first_pos - window + 1, 0)
    kv_base = kv_min // BLOCK_N * BLOCK_N
    split_len = tl.cdiv(tl.cdiv(kv_end - kv_base, NUM_SPLITS), BLOCK_N) * BLOCK_N
    kv_lo = kv_base + split * split_len
    kv_hi = tl.minimum(kv_end, kv_lo + split_len)
    # Keys up to the tile's first query position are visible to every row: no mask needed there (with a
    # window, every tile is masked).
    full_hi = tl.minimum(kv_hi, first_pos + 1)
    unmasked_hi = kv_lo + tl.maximum(full_hi - kv_lo, 0) // BLOCK_N * BLOCK_N
    if HAS_WINDOW:
        unmasked_hi = kv_lo

    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    # A finite floor keeps exp2(m_old - m_new) at 1, not NaN, for rows that see no key yet.
    m_i = tl.full([BLOCK_Q * GROUP_PAD], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    for kv_start in range(kv_lo, unmasked_hi, BLOCK_N):
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, q_pos, kv_start, kv_min, kv_hi, k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head,
            qk_scale, window, softcap, BLOCK_N, HEAD_DIM, PAGE_SIZE, NUM_KV_HEADS, False, DOT_PRECISION,
            HAS_WINDOW, HAS_SOFTCAP, FP8_WORDS, USE_ASM,
        )
    for kv_start in range(unmasked_hi, kv_hi, BLOCK_N):
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, q_pos, kv_start, kv_min, kv_hi, k_cache_ptr, v_cache_ptr, block_table_ptr, kv_head,
            qk_scale, window, softcap, BLOCK_N, HEAD_DIM, PAGE_SIZE, NUM_KV_HEADS, True, DOT_PRECISION,
            HAS_WINDOW, HAS_SOFTCAP, FP8_WORDS, USE_ASM,
        )

    if NUM_SPLITS == 1:
        out_off = (q_start + q_idx).to(tl.int64) * stride_ot + head * stride_oh
        out = acc * (v_scale / l_i)[:, None]
        tl.store(out_ptr + out_off[:, None] + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        # Decode: one query per sequence, so partial state is indexed [seq, head, split].
        part = (seq * (NUM_KV_HEADS * GROUP) + head) * NUM_SPLITS + split
        tl.store(part_m_ptr + part, m_i, mask=row_ok)
        tl.store(part_l_ptr + part, l_i / v_scale, mask=row_ok)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _merge_splits_kernel(
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, query_start_loc_ptr, stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) == q_start:
        return
    splits = tl.arange(0, SPLITS_PAD)
    split_ok = splits < NUM_SPLITS
    part = (seq * NUM_HEADS + head) * NUM_SPLITS + splits
    m = tl.load(part_m_ptr + part, mask=split_ok, other=float("-inf"))
    l_s = tl.load(part_l_ptr + part, mask=split_ok, other=0.0)
    dims = tl.arange(0, HEAD_DIM)
    # acc: [SPLITS_PAD, HEAD_DIM]
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + dims[None, :], mask=split_ok[:, None], other=0.0)
    w = tl.exp2(m - tl.max(m, 0))
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l_s * w, 0)
    out_off = q_start.to(tl.int64) * stride_ot + head * stride_oh
    tl.store(out_ptr + out_off + dims, out.to(out_ptr.dtype.element_ty))


def _check_attention_args(q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables):
    if q.dim() != 3:
        raise ValueError(f"q must be [num_tokens, num_heads, head_dim], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    if q.shape[2] != head_dim or q.shape[1] % num_kv_heads:
        raise ValueError(f"q shape {tuple(q.shape)} does not fit cache shape {tuple(k_cache.shape)}")
    if out.shape != q.shape:
        raise ValueError(f"out shape {tuple(out.shape)} != q shape {tuple(q.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q dtype must be float16, bfloat16 or float32, got {q.dtype}")
    if out.dtype != q.dtype or k_cache.dtype != v_cache.dtype or k_cache.dtype not in (q.dtype, FP8):
        raise ValueError(f"out must have q's dtype {q.dtype} and the caches that dtype or {FP8}, got "
                         f"{out.dtype}, {k_cache.dtype} and {v_cache.dtype}")
    num_seqs = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    if seq_lens.dim() != 1 or query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(f"seq_lens must be [num_seqs] and query_start_loc [num_seqs + 1], got "
                         f"{tuple(seq_lens.shape)} and {tuple(query_start_loc.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables must be [{num_seqs}, max_blocks], got {tuple(block_tables.shape)}")
    for name, t in (("query_start_loc", query_start_loc), ("seq_lens", seq_lens), ("block_tables", block_tables)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")
    devices = {t.device for t in (q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if q.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError(f"q and out must be contiguous in head_dim, got strides {q.stride()} and {out.stride()}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")
    return num_seqs, block_size, num_kv_heads, head_dim


@functools.lru_cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_kv_splits(num_seqs, num_kv_heads, max_seq_len, device) -> int:
    # Enough programs for two waves, but every split keeps at least _SPLIT_KEYS keys to read.
    splits = 1
    max_splits = min(_MAX_SPLITS, triton.cdiv(max_seq_len, _SPLIT_KEYS))
    while num_seqs * num_kv_heads * splits < 2 * _sm_count(device) and splits * 2 <= max_splits:
        splits *= 2
    return splits


def _decode_config(head_dim: int, elem_size: int, splits: int, group: int, cache_size: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for one-query tiles (elem_size: the query's bytes; cache_size: the
    KV cache's): memory-bound, so keep a tile in flight.

    fp32 dots run as FMA loops (ieee precision) and spill registers beyond 16-key tiles. Without splits
    (batches that fill the GPU) and without grouped heads, 128-key tiles beat 64 by 1-2%; with 4 heads a
    group they lose 1% (H200, BENCHMARKS.md). On an fp8 cache without splits, 128-key tiles in one stage
    (70.7 KB of shared memory, 3 programs an SM, against 2 with two stages) beat both, grouped or not: batch
    256 x 1,024 tokens 3.0% (MHA) and 10.5% (GQA) faster on an H200, 0% and 5.4% on an H100.
    """
    if elem_size == 4:
        return 16, 4, 2
    if cache_size == 1 and splits == 1:
        return 128, 4, 1
    return (128, 4, 2) if splits == 1 and group == 1 else (64, 4, 3)


def _prefill_config(head_dim: int, elem_size: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): 128-row tiles on one warpgroup. On an H200 that beat two
    warpgroups by 12-17% on every prompt mix measured (short prompts, 8 x 1,024, 2 x 4,000, a chunk on a
    cached prefix, grouped heads; BENCHMARKS.md)."""
    if elem_size == 4:
        return 32, 32, 4, 2
    return (128 if head_dim <= 128 else 64), 64, 4, 3


def paged_attention(
    q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables, scale, max_query_len, max_seq_len,
    *, num_kv_splits: int | None = None, num_decodes: int = 0, window: int | None = None,
    softcap: float | None = None, k_scale: float = 1.0, v_scale: float = 1.0,
) -> torch.Tensor:
    """Triton paged attention; `num_kv_splits` (decode only) overrides the SM-count heuristic.

    num_decodes: how many leading sequences bring exactly one query (the scheduler's `ScheduledBatch.
    num_decodes`, not checked on the device); when the batch also has longer ones, those get their own
    decode launch. window: each query sees its last `window` positions (None: all); softcap: scores are
    capped as cap * tanh(s / cap) (None: not); k_scale, v_scale: an fp8 cache's scales (it holds x / scale)."""
    # q, out: [num_tokens, num_q_heads, head_dim]; k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    num_seqs, block_size, num_kv_heads, head_dim = _check_attention_args(
        q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables
    )
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"the Triton path needs head_dim a power of two >= 16, got {head_dim}")
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"the Triton path needs CUDA tensors (or TRITON_INTERPRET=1), got {q.device}")
    if num_kv_splits is not None and not 1 <= num_kv_splits <= _MAX_SPLITS:
        raise ValueError(f"num_kv_splits must be in [1, {_MAX_SPLITS}], got {num_kv_splits}")
    if not 0 <= num_decodes <= num_seqs:
        raise ValueError(f"num_decodes must be in [0, {num_seqs}], got {num_decodes}")
    _check_window_and_cap(window, softcap)
    check_scales(k_cache, k_scale, v_scale)
    num_tokens = q.shape[0]
    if num_tokens == 0 or num_seqs == 0 or max_query_len < 1:
        return out
    if max_query_len == 1:
        num_decodes = num_seqs
    args = (q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables, scale * _LOG2E * k_scale, v_scale,
            window, softcap)
    # (in a mixed step max_seq_len may exceed the decodes' longest: some splits then find no keys, harmlessly)
    if num_decodes:
        _launch_decode(*args, num_decodes, min(max_seq_len, window or max_seq_len), num_kv_splits)
    if num_decodes < num_seqs:
        _launch_prefill(*args, num_decodes, num_seqs, num_tokens - num_decodes)
    return out


def _check_window_and_cap(window, softcap) -> None:
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive number of positions, got {window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive, got {softcap!r}")


def _launch_decode(q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables, qk_scale, v_scale, window, softcap,
                   num_seqs, max_seq_len, num_kv_splits):
    """Sequences [0, num_seqs), one query each."""
    _, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    splits = num_kv_splits or _num_kv_splits(num_seqs, num_kv_heads, max_seq_len, q.device)
    block_n, num_warps, num_stages = _decode_config(head_dim, q.element_size(), splits, group, k_cache.element_size())
    if splits > 1:
        part_m = torch.empty((num_seqs, num_heads, splits), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty((num_seqs, num_heads, splits, head_dim), dtype=torch.float32, device=q.device)
    else:
        part_m = part_l = part_acc = out  # never touched
    # tl.dot needs 16 rows, so small groups are padded up to 16.
    _launch((num_seqs, num_kv_heads, splits), q, k_cache, v_cache, out, part_acc, part_m, part_l,
            query_start_loc, seq_lens, block_tables, qk_scale, v_scale, window, softcap, 0, num_seqs,
            GROUP_PAD=max(triton.next_power_of_2(group), 16), BLOCK_Q=1, BLOCK_N=block_n, NUM_SPLITS=splits,
            DECODE=True, num_warps=num_warps, num_stages=num_stages)
    if splits > 1:
        start(
            _merge_splits_kernel, (num_seqs, num_heads),
            out, part_acc, part_m, part_l, query_start_loc, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, NUM_SPLITS=splits,
            SPLITS_PAD=triton.next_power_of_2(splits), num_warps=4,
        )


def _launch_prefill(q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables, qk_scale, v_scale, window, softcap,
                    first_seq, num_seqs, num_tokens):
    """Sequences [first_seq, num_seqs), which bring num_tokens queries in all."""
    _, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group_pad = triton.next_power_of_2(num_heads // num_kv_heads)
    block_m, block_n, num_warps, num_stages = _prefill_config(head_dim, q.element_size())
    block_q = max(block_m, group_pad) // group_pad
    grid = (num_tokens // block_q + num_seqs - first_seq, num_kv_heads, 1)
    _launch(grid, q, k_cache, v_cache, out, out, out, out, query_start_loc, seq_lens, block_tables, qk_scale, v_scale,
            window, softcap, first_seq, num_seqs, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_N=block_n, NUM_SPLITS=1,
            DECODE=False, num_warps=num_warps, num_stages=num_stages)


def _launch(grid, q, k_cache, v_cache, out, part_acc, part_m, part_l, query_start_loc, seq_lens, block_tables,
            qk_scale, v_scale, window, softcap, first_seq, num_seqs, **meta):
    _, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    start(
        _paged_attention_kernel, grid,
        q, k_cache, v_cache, out, part_acc, part_m, part_l,
        query_start_loc, seq_lens, block_tables, qk_scale, v_scale, first_seq, num_seqs, window or 0, softcap or 0.0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        NUM_KV_HEADS=num_kv_heads, GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, PAGE_SIZE=block_size,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", HAS_WINDOW=window is not None,
        HAS_SOFTCAP=softcap is not None, FP8_WORDS=k_cache.dtype == FP8 and meta["DECODE"],  # (prefill: no gain)
        USE_ASM=q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1", **meta,
    )


def paged_attention_ref(
    q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables, scale, max_query_len, max_seq_len,
    *, window: int | None = None, softcap: float | None = None, k_scale: float = 1.0, v_scale: float = 1.0,
) -> torch.Tensor:
    """Plain-torch twin of `paged_attention` (the CPU path): per sequence, gather K/V, attend in fp32. With a
    window, only keys from the first query's window start on are read, as the kernel reads them; an fp8
    cache's codes times its scales."""
    num_seqs, block_size, num_kv_heads, head_dim = _check_attention_args(
        q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables
    )
    _check_window_and_cap(window, softcap)
    check_scales(k_cache, k_scale, v_scale)
    group = q.shape[1] // num_kv_heads
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for b in range(num_seqs):
        q_start, q_len, seq_len = starts[b], starts[b + 1] - starts[b], lens[b]
        if q_len == 0:
            continue
        lo = max(seq_len - q_len - window + 1, 0) if window else 0  # the first key any query here sees
        first_block = lo // block_size
        blocks = block_tables[b, first_block : math.ceil(seq_len / block_size)].long()
        lo_in = lo - first_block * block_size
        # k, v: [num_kv_heads, seq_len - lo, head_dim]
        k = k_cache[blocks].flatten(0, 1)[lo_in : seq_len - first_block * block_size].transpose(0, 1).float() * k_scale
        v = v_cache[blocks].flatten(0, 1)[lo_in : seq_len - first_block * block_size].transpose(0, 1).float() * v_scale
        # qb: [num_kv_heads, group * q_len, head_dim], rows ordered (group member, query)
        qb = q[q_start : q_start + q_len].float().view(q_len, num_kv_heads, group, head_dim)
        qb = qb.permute(1, 2, 0, 3).reshape(num_kv_heads, group * q_len, head_dim)
        positions = torch.arange(seq_len - q_len, seq_len, device=q.device)
        keys = torch.arange(lo, seq_len, device=q.device)[None, :]
        visible = keys <= positions[:, None]
        if window:
            visible &= keys > positions[:, None] - window
        visible = visible.repeat(group, 1)
        if softcap is None:
            o = torch.nn.functional.scaled_dot_product_attention(qb, k, v, attn_mask=visible, scale=scale)
        else:  # Gemma 2's order: scale, cap, mask, softmax in fp32
            scores = softcap * torch.tanh(qb @ k.transpose(1, 2) * scale / softcap)
            o = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v
        # o: [num_kv_heads, group * q_len, head_dim] -> [q_len, num_heads, head_dim]
        o = o.view(num_kv_heads, group, q_len, head_dim).permute(2, 0, 1, 3).reshape(q_len, -1, head_dim)
        out[q_start : q_start + q_len] = o.to(out.dtype)
    return out
