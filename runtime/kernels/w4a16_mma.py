"""The W4A16 mma.sync path for small M (16 or 32 rows of x a program); see `w4a16` for the overview."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmctl.runtime.kernels.w4a16_common import (
    Config,
    check_args,
    check_blocks,
    launch,
    runs_on_gpu,
    scale_zero,
    store_tile,
    word_lanes,
)
from llmctl.runtime.kernels.w4a16_pack import PackedW4


@triton.jit
def _x_tile(x_ptr, offs_m, M, stride_xm, chan, mask_k, EVEN_K: tl.constexpr):
    rows = tl.where(offs_m < M, offs_m, 0).to(tl.int64)  # rows past M read row 0: no row mask in the loop
    if EVEN_K:
        return tl.load(x_ptr + rows[:, None] * stride_xm + chan[None, :])
    else:
        return tl.load(x_ptr + rows[:, None] * stride_xm + chan[None, :], mask=mask_k[None, :], other=0.0)


@triton.jit
def _mma_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, bias_ptr, out_ptr, ws_ptr,
                M, N, K, stride_xm, k_per_split,
                GROUP_SIZE: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB_M: tl.constexpr, EVEN_K: tl.constexpr,
                DOT_FP32: tl.constexpr, USE_ASM: tl.constexpr):
    """out = x @ W, 16 * SUB_M (16 or 32) rows of x per program in SUB_M dots of 16 rows, both on one
    unpacked weight tile. 16-row dots are mma.sync (Hopper's wgmma needs 64), whose second operand lives in
    registers: Triton then loads each thread's packed words straight into the layout that operand wants
    (eight consecutive channels of a column per thread: one word), so the tile never visits shared memory
    after its cp.async, and the unpacking is shared by every row of the program."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, 16 * SUB_M)
    pid_m = pid % num_m  # M tiles vary fastest: neighbours share (and L2 keeps) one weight tile
    pid_n = pid // num_m
    offs_m = pid_m * 16 * SUB_M + tl.arange(0, 16)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = tl.arange(0, BLOCK_K // 8)
    acc0 = tl.zeros([16, BLOCK_N], dtype=tl.float32)
    acc1 = tl.zeros([16, BLOCK_N], dtype=tl.float32)  # used when SUB_M == 2
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_w = k0 // 8 + rows
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        chan = offs_k
        if HAS_PERM:
            chan = tl.load(perm_ptr + offs_k, mask=mask_k, other=0)
        if EVEN_K:  # every block is whole
            mask_w = offs_w >= 0  # all true: scale_zero's per-row loads want a mask
            words = tl.load(qw_ptr + offs_w[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
        else:
            mask_w = offs_w < K // 8
            words = tl.load(qw_ptr + offs_w[:, None] * N + offs_n[None, :], mask=mask_w[:, None] & mask_n[None, :],
                            other=0)  # [BLOCK_K/8, BLOCK_N]
        s, zf = scale_zero(s_ptr, z_ptr, k0, offs_w, mask_w, offs_n, mask_n, N, GROUP_SIZE, BLOCK_K)
        w0, w1, w2, w3, w4, w5, w6, w7 = word_lanes(words, zf, s, x_ptr.dtype.element_ty, USE_ASM)
        # [BLOCK_K/8, BLOCK_N, 2, 2, 2] with lane 4a + 2b + c at [.., a, b, c] -> row 8r + lane of [BLOCK_K, BLOCK_N]
        lanes = tl.join(tl.join(tl.join(w0, w4), tl.join(w2, w6)), tl.join(tl.join(w1, w5), tl.join(w3, w7)))
        w = tl.reshape(tl.permute(lanes, (0, 2, 3, 4, 1)), [BLOCK_K, BLOCK_N])
        if DOT_FP32:
            w = w.to(tl.float32)
        acc0 = _dot(_x_tile(x_ptr, offs_m, M, stride_xm, chan, mask_k, EVEN_K), w, acc0, DOT_FP32)
        if SUB_M > 1:
            acc1 = _dot(_x_tile(x_ptr, offs_m + 16, M, stride_xm, chan, mask_k, EVEN_K), w, acc1, DOT_FP32)
    store_tile(acc0, offs_m[:, None], offs_n[None, :], bias_ptr, out_ptr, ws_ptr, pid_k, M, N, HAS_BIAS, SPLIT)
    if SUB_M > 1:
        store_tile(acc1, offs_m[:, None] + 16, offs_n[None, :], bias_ptr, out_ptr, ws_ptr, pid_k, M, N, HAS_BIAS,
                   SPLIT)


@triton.jit
def _dot(x, w, acc, DOT_FP32: tl.constexpr):
    if DOT_FP32:
        return acc + tl.dot(x.to(tl.float32), w, input_precision="ieee")
    else:
        return tl.dot(x, w, acc)


def mma(x: torch.Tensor, w: PackedW4, bias: torch.Tensor | None = None, cfg: Config | None = None) -> torch.Tensor:
    """x: [M, K] -> [M, N] as x @ W on mma.sync: cfg.block_m (16 or 32) rows of x by cfg.block_n
    weight columns per program (fp32 x: exact fp32 products on the FMA units instead)."""
    cfg = cfg or Config("mma", 16, 128, 128, 1, 4, 3)
    check_args(x, w, bias)
    check_blocks(cfg, w)
    if cfg.block_m not in (16, 32) or cfg.block_n < 16:
        raise ValueError(f"mma needs block_m of 16 or 32 and block_n >= 16, got {cfg}")

    def grid(m, n):
        return (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k)

    # As in `tiled`: fp32 x wants exact products, and the interpreter's bf16 tl.dot is wrong (Triton 3.9).
    dot_fp32 = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and not runs_on_gpu(x))
    use_asm = x.dtype != torch.float32 and runs_on_gpu(x)
    # every block is whole when K is: splits are whole blocks
    return launch(_mma_kernel, grid, x, w, bias, cfg, SUB_M=cfg.block_m // 16,
                  EVEN_K=w.in_features % cfg.block_k == 0, DOT_FP32=dot_fp32, USE_ASM=use_asm)
