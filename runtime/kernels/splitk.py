"""What the one-row-at-a-time GEMVs (`fp8_gemv`, `dense_gemv`) share: their launch configuration, and split-K
summed without a second kernel. Each split stores its fp32 partial sums and the last split of a tile to
arrive (counted with an acq_rel atomic on a per-device counter buffer) adds them up in split order, so the
sum is deterministic; a launch costs about as much as a small layer's whole GEMV."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_SPLIT = 16


@dataclass(frozen=True)
class GemvConfig:
    """One launch: BLOCK_N output channels by BLOCK_K input channels a step; split_k programs share K."""

    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    packed: bool = False  # one row: read W as 32-bit words of four weights (`_words_kernel`)


@triton.jit
def finish(acc, offs_m, offs_n, ws_ptr, lock_ptr, bias_ptr, out_ptr, M, N, pid_m, pid_n, pid_k,
            HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M]: this split's sums for out[offs_m, offs_n]. With SPLIT > 1 the partial sums go to
    the workspace [SPLIT, M, N], and the last split of the tile to arrive sums them and resets its counter."""
    mask = (offs_n < N)[:, None] & (offs_m < M)[None, :]
    idx = offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]  # [BLOCK_N, BLOCK_M], out's offsets
    if SPLIT > 1:
        tile = pid_m * tl.num_programs(0) + pid_n
        tl.store(ws_ptr + (pid_k * M).to(tl.int64) * N + idx, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial sums are out before the count goes up
        if tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel") == SPLIT - 1:
            acc = tl.zeros(acc.shape, dtype=tl.float32)
            for i in tl.static_range(SPLIT):
                acc += tl.load(ws_ptr + (i * M).to(tl.int64) * N + idx, mask=mask, other=0.0, cache_modifier=".cg")
            _store(acc, idx, mask, offs_n, bias_ptr, out_ptr, N, HAS_BIAS)
            tl.atomic_xchg(lock_ptr + tile, 0)  # ready for the next launch
    else:
        _store(acc, idx, mask, offs_n, bias_ptr, out_ptr, N, HAS_BIAS)


@triton.jit
def _store(acc, idx, mask, offs_n, bias_ptr, out_ptr, N, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + idx, acc.to(out_ptr.dtype.element_ty), mask=mask)


COUNTERS: dict[torch.device, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # buffers COUNTERS outgrew: CUDA graphs captured before may still use them


def counters(x: torch.Tensor, tiles: int) -> torch.Tensor | None:
    """Split-K arrival counters for `tiles` output tiles on x's device, zero between launches (the last split of
    a tile resets its own). One buffer per device serves every split-K kernel (these, and W4A16's GEMVs):
    launches on one stream run one after the other. None mid-capture where the buffer is too small: it cannot
    be made there (it would live in the graph's pool), and the launch does not split. An outgrown buffer is
    kept, all zeros, for the graphs that captured it."""
    buf = COUNTERS.get(x.device)
    if buf is None or buf.numel() < tiles:
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return None
        if buf is not None:
            _RETIRED.append(buf)
        buf = COUNTERS[x.device] = torch.zeros(max(tiles, 1 << 16), dtype=torch.int32, device=x.device)
    return buf


def plan(x: torch.Tensor, out: torch.Tensor, k: int, cfg: GemvConfig, tiles: int):
    """(split, channels of K a split takes, fp32 workspace [split, M, N], arrival counters) for a launch of cfg
    over `tiles` output tiles; without a split (none asked, or no counters to be had) the last two are `out`
    (unused pointers)."""
    split = min(cfg.split_k, triton.cdiv(k, cfg.block_k))
    locks = counters(x, tiles) if split > 1 else None
    per_split = triton.cdiv(triton.cdiv(k, split if locks is not None else 1), cfg.block_k) * cfg.block_k
    split = triton.cdiv(k, per_split)  # no split without work: it would never arrive
    if split == 1:
        return split, per_split, out, out
    return split, per_split, torch.empty(split, *out.shape, dtype=torch.float32, device=x.device), locks
