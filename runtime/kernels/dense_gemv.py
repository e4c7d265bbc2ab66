"""Batch-1 decode's GEMV for 16-bit weights: y = x @ W.T (+ bias), W [N, K] fp16 / bf16 as nn.Linear holds it.

A decode step of one sequence reads every weight once: the step is its linears' bytes over the memory
bandwidth. cuBLAS's GEMV for the 7B shape's projections reads 2.4-3.6 TB/s on an H200 (BENCHMARKS.md's
W4A16 table, cold weights, CUDA graphs), 50-75% of the card's 4.8: the 222 tok/s of fp16 single-stream
decode where reading the weights once would allow ~355. This GEMV is built for latency rather than
arithmetic: split-K puts several programs on every SM, and each program loads the next step's tile while
it multiplies this one (`PREFETCH`), so a warp never waits out a whole DRAM round trip per step (Triton
pipelines only loads that feed a tl.dot). The runtime uses it for a shape only where it measured faster
than cuBLAS at start-up (`layers.dense_linear`).

One row of x a program (more rows: one program each, the weight read again from L2). Each thread sums the
eight products of its 16-byte load in registers into an fp32 [BLOCK_N, BLOCK_K / 8] accumulator, reduced
once at the end (a full [BLOCK_N, BLOCK_K] one took 158 registers at 32 x 256, this 80: sass_report
dense); the split-K sums are added by the last split to arrive (`splitk`, shared with `fp8_gemv`).

`pretune` times each weight shape at M = 1 against cuBLAS at start-up and keeps this kernel's fastest
configuration only where it wins (`chosen`; None: cuBLAS), kept for the next process on this GPU
(`gemv_cache`). LLMCTL_DENSE_GEMV=0 keeps cuBLAS everywhere.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llmctl.runtime.kernels import gemv_cache
from llmctl.runtime.kernels.compiling import in_parallel, start
from llmctl.runtime.kernels.splitk import GemvConfig, finish, plan
from llmctl.runtime.kernels.w4a16.common import PER_STEP

W_DTYPES = (torch.float16, torch.bfloat16)


@triton.jit
def _tile(w_rows, x_row, k0, k_end, k_last, offs_k, mask_n, K, EVEN: tl.constexpr):
    """One step's weight tile [BLOCK_N, BLOCK_K] and x [BLOCK_K]. A step at or past k_end (the prefetch after
    a split's last step) reloads k_last's tile instead, from cache, so the loop's loads stay unmasked."""
    ks = tl.where(k0 < k_end, k0, k_last) + offs_k
    if EVEN:
        w = tl.load(w_rows + ks[None, :])
    else:
        w = tl.load(w_rows + ks[None, :], mask=mask_n[:, None] & (ks < K)[None, :], other=0.0)
    return w, tl.load(x_row + ks, mask=ks < K, other=0.0)


@triton.jit(do_not_specialize=PER_STEP)
def _dense_gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr, M, N, K, stride_xm, k_per_split,
                       HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, EVEN: tl.constexpr, PREFETCH: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[m, n] = sum_k W[n, k] x[m, k] over this program's split of K, for BLOCK_N channels of one row m."""
    pid_n, pid_k, m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    w_rows = w_ptr + tl.where(mask_n, offs_n, 0).to(tl.int64)[:, None] * K  # rows past N read row 0
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    offs_k = tl.arange(0, BLOCK_K)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros([BLOCK_N, BLOCK_K // 8], dtype=tl.float32)
    if PREFETCH:
        w_next, x_next = _tile(w_rows, x_row, k_start, k_end, k_start, offs_k, mask_n, K, EVEN)
    for k0 in range(k_start, k_end, BLOCK_K):
        if PREFETCH:  # this step's tile was loaded a step ago; load the next step's now
            w, x = w_next, x_next
            w_next, x_next = _tile(w_rows, x_row, k0 + BLOCK_K, k_end, k0, offs_k, mask_n, K, EVEN)
        else:
            w, x = _tile(w_rows, x_row, k0, k_end, k0, offs_k, mask_n, K, EVEN)
        prod = w.to(tl.float32) * x.to(tl.float32)[None, :]
        acc += tl.sum(tl.reshape(prod, [BLOCK_N, BLOCK_K // 8, 8]), axis=2)
    offs_m = m + tl.zeros([1], dtype=tl.int32)
    finish(tl.sum(acc, axis=1)[:, None], offs_m, offs_n, ws_ptr, lock_ptr, bias_ptr, out_ptr, M, N, m, pid_n, pid_k,
            HAS_BIAS, SPLIT)


def check_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be 2-D [M, K] with contiguous rows, got shape {tuple(x.shape)} strides {x.stride()}")
    if weight.dim() != 2 or not weight.is_contiguous() or weight.dtype not in W_DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"the weight must be a contiguous [N, K] float16 or bfloat16 of x's dtype {x.dtype}, got "
                         f"{weight.dtype} {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[1]} input features, the weight {weight.shape[1]}")
    if bias is not None and (bias.shape != (weight.shape[0],) or not bias.is_contiguous() or bias.dtype != x.dtype):
        raise ValueError(f"bias must be contiguous [{weight.shape[0]}] of {x.dtype}, got {bias.dtype} {tuple(bias.shape)}")
    if any(t.device != x.device for t in (weight, *(() if bias is None else (bias,)))):
        raise ValueError(f"x is on {x.device} but the weight or bias is not")


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         cfg: GemvConfig | None = None) -> torch.Tensor:
    """x: [M, K] -> [M, N] in x's dtype, M small (one program a row); num_stages >= 2 loads a step ahead."""
    check_args(x, weight, bias)
    (m, k), n = x.shape, weight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    cfg = cfg or GemvConfig(32, 256, 4, 4, 1)
    tiles_n = triton.cdiv(n, cfg.block_n)
    split, per_split, ws, locks = plan(x, out, k, cfg, tiles_n * m)
    start(_dense_gemv_kernel, (tiles_n, split, m),
          x, weight, bias if bias is not None else out, out, ws, locks, m, n, k, x.stride(0), per_split,
          HAS_BIAS=bias is not None, SPLIT=split, EVEN=n % cfg.block_n == 0 and k % cfg.block_k == 0,
          PREFETCH=cfg.num_stages >= 2, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
          num_stages=1)
    return out


# Configurations timed at start-up (each split-K value compiles its own kernel): wide K steps (many 16-byte loads
# in flight a thread) loading in-step, and a narrower one loading a step ahead.
CANDIDATES = tuple(GemvConfig(bn, bk, split, warps, stages) for bn, bk, warps, stages in
                   ((16, 512, 4, 1), (32, 256, 4, 1), (8, 1024, 4, 1), (16, 512, 4, 2)) for split in (1, 4, 8))
_chosen: dict[tuple, GemvConfig | None] = {}
MARGIN = 0.97  # a configuration must beat cuBLAS by 3%: a tie is not worth a different summation order


def key(weight: torch.Tensor) -> tuple:
    return tuple(weight.shape), weight.dtype, weight.device


def chosen(weight: torch.Tensor) -> GemvConfig | None:
    """The configuration that beat cuBLAS for this weight's shape at M = 1, or None (cuBLAS; also when untimed)."""
    return _chosen.get(key(weight))


def pretune(weights, dtype: torch.dtype) -> int:
    """For each distinct [N, K] of these CUDA weights, time cuBLAS and every candidate at one row and remember
    the fastest, None meaning cuBLAS (the candidates compiled on every core first), unless an earlier process
    on this GPU did (`gemv_cache`). Returns the shapes timed."""
    if os.environ.get("LLMCTL_DENSE_GEMV", "1") == "0" or dtype not in W_DTYPES:
        return 0
    todo = list({key(w): w for w in weights if key(w) not in _chosen and w.is_cuda and w.dtype == dtype
                 and w.is_contiguous()}.values())
    if not todo:
        return 0
    from llmctl.runtime.kernels.timing import agrees

    cache, stored = gemv_cache.known(todo[0].device)
    rows = {w.shape[1]: torch.randn(1, w.shape[1], dtype=dtype, device=w.device) for w in todo}
    for w in todo:  # a choice read back is used once it agrees with cuBLAS here (None: cuBLAS itself)
        name, x = gemv_cache.name("dense", w, dtype, 1), rows[w.shape[1]]
        if name in stored and (stored[name] is None or agrees(lambda c, x=x, w=w: gemv(x, w, None, c),
                                                              stored[name], F.linear(x, w).float())):
            _chosen[key(w)] = stored[name]
    todo = [w for w in todo if key(w) not in _chosen]
    in_parallel(lambda w=w, c=c: gemv(rows[w.shape[1]], w, None, c) for w in todo for c in CANDIDATES)
    for w in todo:
        _chosen[key(w)] = _fastest(rows[w.shape[1]], w)
    gemv_cache.save(cache, {gemv_cache.name("dense", w, dtype, 1): _chosen[key(w)] for w in todo})
    return len(todo)


def _fastest(x: torch.Tensor, weight: torch.Tensor) -> GemvConfig | None:
    """The fastest candidate at M = 1 if it beats cuBLAS by MARGIN (each checked against cuBLAS first)."""
    from llmctl.runtime.kernels.timing import fastest, graph_ms

    return fastest(lambda cfg: gemv(x, weight, None, cfg), CANDIDATES, F.linear(x, weight).float(),
                   best_ms=MARGIN * graph_ms(lambda: F.linear(x, weight)))
