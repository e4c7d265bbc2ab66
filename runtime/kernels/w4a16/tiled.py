"""The W4A16 tensor-core path for medium M; see `w4a16` for the overview."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmctl.runtime.kernels.w4a16.common import (
    PER_STEP,
    Config,
    check_args,
    check_blocks,
    launch,
    runs_on_gpu,
    scale_zero,
    store_tile,
    word_lanes,
)
from llmctl.runtime.kernels.w4a16.pack import PackedW4


@triton.jit
def _operand(w0, w1, w2, w3, w4, w5, w6, w7, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Eight [ROWS, COLS] lanes of the interleaved words -> the [ROWS, COLS * 8] tile in channel order.

    Word 4i + c holds channels 2c + 8j + p of chunk i at lane j + 4p, so column 32i + 8j + 2c + p comes
    from lane j + 4p of word 4i + c: a permutation that keeps each thread's registers where they are,
    because a thread of Hopper's wgmma holds, for its rows, exactly the channel pairs (2c + 8j, + 1) of
    each chunk: the words' layout is the first operand's, and the tile never visits shared memory."""
    q = tl.join(tl.join(tl.join(w0, w4), tl.join(w1, w5)), tl.join(tl.join(w2, w6), tl.join(w3, w7)))
    q = tl.reshape(q, [ROWS, COLS // 4, 4, 2, 2, 2])  # [row, i, c, p, j & 1, j >> 1]
    return tl.reshape(tl.permute(q, (0, 1, 5, 4, 2, 3)), [ROWS, COLS * 8])


@triton.jit(do_not_specialize=PER_STEP)
def _tiled_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, bias_ptr, out_ptr, ws_ptr,
                  M, N, K, stride_xm, k_per_split,
                  GROUP_SIZE: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
                  USE_ASM: tl.constexpr, EVEN: tl.constexpr):
    """out.T = W.T @ x.T: the dequantized weight tile is the MMA's first operand [BLOCK_N, BLOCK_K], held
    in registers just as the words were loaded, and x.T its second (pipelined through shared memory), so
    BLOCK_M rows of x may be as few as 16 at no cost in weight traffic, and each block is one full-K dot.
    EVEN (see `even`): the loop loads unmasked (~14% fewer instructions a step, 4-7% less time at M = 4-64:
    BENCHMARKS.md)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_m  # M tiles vary fastest: neighbours share (and L2 keeps) one weight tile
    pid_n = pid // num_m
    dtype = x_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_x = tl.where(offs_m < M, offs_m, 0).to(tl.int64)  # rows past M read row 0: no row mask on x
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = tl.arange(0, BLOCK_K // 8)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    s_next, zf_next = scale_zero(s_ptr, z_ptr, k_start, k_start // 8 + rows, k_start // 8 + rows < K // 8, offs_n,
                                 offs_n < tl.where(k_start < k_end, N, 0), N, GROUP_SIZE, BLOCK_K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_w = k0 // 8 + rows
        mask_w = offs_w < K // 8
        word_ptrs = qw_ptr + offs_w[None, :] * N + offs_n[:, None]  # [BLOCK_N, BLOCK_K/8]
        if EVEN:
            words = tl.load(word_ptrs)
        else:
            words = tl.load(word_ptrs, mask=mask_n[:, None] & mask_w[None, :], other=0)
        s, zf = tl.trans(s_next), tl.trans(zf_next)
        # The next step's scales and zeros, loaded a step ahead: Triton pipelines the words and x through shared
        # memory but not these, whose latency every step otherwise waited out (scripts/sass_report.py shows the
        # loads issued a step before their use).
        k_next = k0 + BLOCK_K
        s_next, zf_next = scale_zero(s_ptr, z_ptr, k_next, offs_w + BLOCK_K // 8, offs_w + BLOCK_K // 8 < K // 8,
                                     offs_n, offs_n < tl.where(k_next < k_end, N, 0), N, GROUP_SIZE, BLOCK_K)
        w0, w1, w2, w3, w4, w5, w6, w7 = word_lanes(words, zf, s, dtype, USE_ASM)
        w = _operand(w0, w1, w2, w3, w4, w5, w6, w7, BLOCK_N, BLOCK_K // 8)  # [BLOCK_N, BLOCK_K]
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        chan = offs_k
        if HAS_PERM:
            chan = tl.load(perm_ptr + offs_k) if EVEN else tl.load(perm_ptr + offs_k, mask=mask_k, other=0)
        x_ptrs = x_ptr + rows_x[None, :] * stride_xm + chan[:, None]  # [BLOCK_K, BLOCK_M]
        xt = tl.load(x_ptrs) if EVEN else tl.load(x_ptrs, mask=mask_k[:, None], other=0.0)
        if DOT_FP32:
            acc += tl.dot(w.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(w, xt, acc)
    store_tile(acc, offs_m[None, :], offs_n[:, None], bias_ptr, out_ptr, ws_ptr, pid_k, M, N, HAS_BIAS, SPLIT)


def tiled(x: torch.Tensor, w: PackedW4, bias: torch.Tensor | None = None, cfg: Config | None = None) -> torch.Tensor:
    """x: [M, K] -> [M, N] as (W.T @ x.T).T: tiles of cfg.block_n weight columns on the MMA's first operand
    (64 or more for Hopper's wgmma), cfg.block_m (>= 16) rows of x on its second."""
    cfg = cfg or Config("tiled", 16, 64, 128)
    check_args(x, w, bias)
    check_blocks(cfg, w)
    if cfg.block_m < 16 or cfg.block_n < 16:
        raise ValueError(f"{cfg.kind} needs block_m and block_n >= 16, got {cfg}")

    def grid(m, n):
        return (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k)

    # fp32 x wants exact fp32 products, not TF32; Triton's interpreter gets bf16 tl.dot wrong (3.9), so
    # there bf16 tiles are multiplied in fp32 too: the same products, accumulated in fp32 either way.
    dot_fp32 = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and not runs_on_gpu(x))
    use_asm = x.dtype != torch.float32 and runs_on_gpu(x)
    return launch(_tiled_kernel, grid, x, w, bias, cfg, BLOCK_M=cfg.block_m, DOT_FP32=dot_fp32, USE_ASM=use_asm,
                  EVEN=even(w, cfg))


def even(w: PackedW4, cfg: Config) -> bool:
    """Whole blocks of K and of N: every step of every split then lies inside the weight (a split's steps
    start at multiples of block_k and stop at K; splits past K take none), so no load needs a mask."""
    return w.in_features % cfg.block_k == 0 and w.out_features % cfg.block_n == 0
