"""Which blocks the fused-MoE kernels use for a shape: timed once per (expert shape, int4 group, top-k, dtype,
M bucket) on the GPU and cached in memory; the runtime tunes every bucket its steps can meet at start-up
(`pretune`), so no step stops to time candidates and none is timed inside a CUDA-graph capture (a bucket
first met there takes the heuristic). Under Triton's interpreter: the heuristic's large blocks.

A configuration is (block_m, up tile, down tile), a tile being (block_n, block_k, warps, stages). An int4
K tile must lie inside one quantization group (block_k divides the group size).
"""

from __future__ import annotations

import torch
import triton

from llmctl.runtime.kernels.compiling import in_parallel, is_warming
from llmctl.runtime.kernels.fused_moe import Int4Experts, fused_moe_ref, launch, operands


def heuristic(rows: int, experts: int, interpreted: bool, hidden: int = 0, inter: int = 0,
              group: int | None = None) -> tuple:
    """A configuration without timing: (block_m, up tile, down tile), a tile being (block_n, block_k,
    warps, stages). group: the int4 experts' group size (a K tile stays inside one group), None if dense."""
    per_expert = rows / max(1, min(experts, rows))
    bm = 16 if per_expert <= 16 else 32 if per_expert <= 32 else 64
    if interpreted:  # the interpreter pays per program: blocks as large as the matrices
        def tile(n: int, k: int) -> tuple:
            bk = min(256, max(16, triton.next_power_of_2(k)))
            return min(256, max(16, triton.next_power_of_2(n))), min(bk, group & -group) if group else bk, 4, 1
        return bm, tile(inter, hidden), tile(hidden, inter)
    if group:
        bk = min(64, group & -group)  # the largest power of two dividing the group, at most 64
        return bm, (64, bk, 4, 2), (64, bk, 4, 2)
    return bm, (64, 128, 4, 3), (64, 128, 4, 3)


_tuned: dict[tuple, tuple] = {}


def _key(x: torch.Tensor, w13, top_k: int) -> tuple:
    group = w13.group_size if isinstance(w13, Int4Experts) else None
    return (tuple(w13.shape), group, top_k, x.dtype, triton.next_power_of_2(max(1, x.shape[0])))


# (block_n, block_k, warps, stages) timed for either kernel: the five that won on an H200 over Qwen3-30B-A3B
# and Mixtral shapes at batches 1-64 out of 16, and (128, 64, 4, 3). Each candidate costs a compile at start-up.
TILES = ((64, 128, 4, 3), (64, 128, 4, 4), (128, 128, 4, 3), (128, 128, 8, 4), (64, 64, 4, 4), (128, 64, 4, 3))
# int4 tiles stream codes as [block_k, block_n] words: smaller, fewer stages, or they overflow shared memory.
INT4_TILES = ((64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 2), (128, 32, 4, 3), (64, 32, 4, 3), (32, 64, 4, 2))


def candidates(rows: int, experts: int, group: int | None = None) -> list[tuple]:
    """(block_m, tiles) pairs worth timing: block_m follows the rows an expert gets."""
    per_expert = rows / max(1, min(experts, rows))
    bms = [16] if per_expert <= 8 else [16, 32] if per_expert <= 32 else [32, 64]
    tiles = TILES if group is None else tuple(t for t in INT4_TILES if group % t[1] == 0)
    return [(bm, tiles) for bm in bms]


def tune(x, w13, w2, weights, ids) -> tuple:
    """For each block_m worth trying, the fastest up tile, then the fastest down tile beside it; keep the
    fastest pair. A tile that fails to build or strays from the twin is never picked."""
    from llmctl.runtime.kernels.timing import graph_ms

    want = fused_moe_ref(x, w13, w2, weights, ids).float()
    tol = 2e-2 * want.abs().max().item() + 1e-3

    def ms(cfg) -> float:
        try:
            if (launch(x, w13, w2, weights, ids, cfg).float() - want).abs().max().item() > tol:
                return float("inf")
            return graph_ms(lambda: launch(x, w13, w2, weights, ids, cfg))
        except Exception:  # out of shared memory or registers on this GPU: not a candidate
            return float("inf")

    group = w13.group_size if isinstance(w13, Int4Experts) else None
    fallback = heuristic(x.shape[0] * ids.shape[1], w13.shape[0], False, group=group)
    best, best_ms = fallback, float("inf")
    for bm, tiles in candidates(x.shape[0] * ids.shape[1], w13.shape[0], group):
        if not tiles:  # groups smaller than every tile's block_k: the heuristic's tile fits any group
            break
        up_ms = {t: ms((bm, t, fallback[2])) for t in tiles}
        up = min(up_ms, key=up_ms.get)
        down_ms = {t: ms((bm, up, t)) for t in tiles}
        down = min(down_ms, key=down_ms.get)
        if down_ms[down] < best_ms:
            best, best_ms = (bm, up, down), down_ms[down]
    _tuned[_key(x, w13, ids.shape[1])] = best
    return best


def choose(x, w13, w2, weights, ids) -> tuple:
    """The configuration for this call: the interpreter's, a tuned one, or (first met in a capture or while
    compiling ahead) the heuristic."""
    rows = x.shape[0] * ids.shape[1]
    group = w13.group_size if isinstance(w13, Int4Experts) else None
    if x.device.type != "cuda":
        return heuristic(rows, w13.shape[0], True, w13.shape[2], w2.shape[2], group)
    cfg = _tuned.get(_key(x, w13, ids.shape[1]))
    if cfg is None:
        cfg = (heuristic(rows, w13.shape[0], False, group=group)
               if torch.cuda.is_current_stream_capturing() or is_warming()  # (nothing may be timed)
               else tune(x, w13, w2, weights, ids))
    return cfg


def pretune(layers, dtype: torch.dtype, max_m: int) -> int:
    """Tune every M bucket up to max_m's for each distinct expert shape (random routing), before serving; every
    tile the timing will try is compiled on every core first (`compiling.in_parallel`)."""
    buckets, seen = [], set()
    for moe in layers:
        shape = (tuple(moe.w13.shape), moe.top_k)
        if shape in seen:
            continue
        seen.add(shape)
        experts, _, hidden = moe.w13.shape
        for m in (1 << i for i in range(triton.next_power_of_2(max_m).bit_length())):
            x = torch.randn(m, hidden, dtype=dtype, device=operands(moe.w13)[0].device) * 0.1
            if _key(x, moe.w13, moe.top_k) in _tuned:
                continue
            ids = torch.rand(m, experts, device=x.device).topk(moe.top_k, dim=-1).indices
            buckets.append((x, moe.w13, moe.w2, torch.rand(m, moe.top_k, device=x.device), ids))
    in_parallel(lambda b=b, cfg=cfg: launch(*b, cfg) for b in buckets for cfg in _compiled_by_tune(*b))
    for b in buckets:
        tune(*b)
    return len(buckets)


def _compiled_by_tune(x, w13, w2, weights, ids) -> list[tuple]:
    """Configurations whose launches compile every up and down kernel `tune` may try for this bucket."""
    group = w13.group_size if isinstance(w13, Int4Experts) else None
    return [(bm, tile, tile) for bm, tiles in candidates(x.shape[0] * ids.shape[1], w13.shape[0], group)
            for tile in tiles]
