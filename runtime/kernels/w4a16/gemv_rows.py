"""The fp16x2 GEMV for a few rows of x at once (M = 2 to 16): each weight is loaded and unpacked once
per program and multiplied into ROWS rows, where `gemv_h2` loads and unpacks it once per row.

In `gemv_h2`'s PTX a word costs 9 instructions to unpack (LOP3 + HFMA2 per pair) and 4 to multiply.
Here one PTX block turns each word into its four dequantized fp16x2 pairs, then one block per row and
word pair multiplies eight of them into that row's sum (fp16x2 FMAs summed to fp32 in `gemv_h2`'s
order, so each row's result is bit-identical to `gemv_h2`'s). Each row keeps its own accumulator in
`gemv_h2`'s 2-D layout (ROWS = 2, 4 or 8 accumulators under constexpr guards): a row axis on a 3-D tile
made Triton spread the rows over threads, reloading x and unpacking each word once per row again.

sm_90 SASS of the main loop (`scripts/sass_report.py`, 4096 x 4096, BLOCK_N 64, BLOCK_K 128, 4 warps),
instructions per weight and row: 3.5 for `gemv_h2`, 2.2 at 2 rows, 1.6 at 4, 1.3 at 8 (72, 111 and 168
registers, no spills). Rows past M read row 0 and are not stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmctl.runtime.kernels.w4a16.common import PER_STEP, Config, runs_on_gpu
from llmctl.runtime.kernels.w4a16.gemv import finish_row, gemv, launch_gemv
from llmctl.runtime.kernels.w4a16.gemv_h2 import _word_twin, _x_pairs, fits, step_rows, step_words
from llmctl.runtime.kernels.w4a16.pack import PackedW4

ROWS = (2, 4, 8)  # rows a program may take (tl.dot-free: any power of two that keeps the sums in registers)

# One word's four dequantized pairs (lanes (0, 4), (1, 5), (2, 6), (3, 7), divided by 128 as in gemv_h2):
# $4 the word, $5 / $6 the -(8 + z/128) / -(0.5 + z/128) pairs.
_UNPACK = tl.constexpr("""
{
.reg .b32 t, h, ce, co;
mov.b32 ce, 0x20002000;
mov.b32 co, 0x10001000;
lop3.b32 t, $4, 0x000F000F, 0x64006400, 0xEA;
fma.rn.f16x2 $0, t, ce, $5;
lop3.b32 t, $4, 0x00F000F0, 0x64006400, 0xEA;
fma.rn.f16x2 $1, t, co, $6;
shr.u32 h, $4, 8;
lop3.b32 t, h, 0x000F000F, 0x64006400, 0xEA;
fma.rn.f16x2 $2, t, ce, $5;
lop3.b32 t, h, 0x00F000F0, 0x64006400, 0xEA;
fma.rn.f16x2 $3, t, co, $6;
}
""")
# One row against two words: $1-$8 the words' pairs, $9-$16 the row's x pairs; the products summed in the
# order gemv_h2 sums them, then the two halves in fp32.
_ROW_DOT = tl.constexpr("\n".join(
    ["{", ".reg .b32 acc;", ".reg .b16 lo, hi;", ".reg .f32 fl, fh;", "mul.rn.f16x2 acc, $1, $9;"]
    + [f"fma.rn.f16x2 acc, ${1 + i}, ${9 + i}, acc;" for i in range(1, 8)]
    + ["mov.b32 {lo, hi}, acc;", "cvt.f32.f16 fl, lo;", "cvt.f32.f16 fh, hi;", "add.f32 $0, fl, fh;", "}"]))


@triton.jit
def _unpack(words, ze, zo):
    return tl.inline_asm_elementwise(_UNPACK, "=r,=r,=r,=r,r,r,r", [words, ze, zo],
                                     dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _row_step(acc, s, x_ptr, row, M, stride_xm, perm_ptr, ra, rb, mask_a, mask_b, wa, wb, ze, zo,
              da0, da1, da2, da3, db0, db1, db2, db3, HAS_PERM: tl.constexpr, USE_ASM: tl.constexpr):
    """One row's sums over two word rows, from the words' pairs unpacked once for every row (row >= M reads
    row 0; its sums are never stored)."""
    base = tl.where(row < M, row, 0).to(tl.int64) * stride_xm
    a04, a15, a26, a37 = _x_pairs(x_ptr, base, perm_ptr, ra, mask_a, HAS_PERM, USE_ASM)
    b04, b15, b26, b37 = _x_pairs(x_ptr, base, perm_ptr, rb, mask_b, HAS_PERM, USE_ASM)
    if USE_ASM:
        part = tl.inline_asm_elementwise(
            _ROW_DOT, "=f,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
            [da0, da1, da2, da3, db0, db1, db2, db3, tl.broadcast_to(a04, wa.shape), tl.broadcast_to(a15, wa.shape),
             tl.broadcast_to(a26, wa.shape), tl.broadcast_to(a37, wa.shape), tl.broadcast_to(b04, wa.shape),
             tl.broadcast_to(b15, wa.shape), tl.broadcast_to(b26, wa.shape), tl.broadcast_to(b37, wa.shape)],
            dtype=tl.float32, is_pure=True, pack=1)
    else:  # Triton's interpreter: gemv_h2's twin
        part = _word_twin(wa, a04, a15, a26, a37, ze, zo) + _word_twin(wb, b04, b15, b26, b37, ze, zo)
    return acc + s * part


@triton.jit(do_not_specialize=PER_STEP)
def _gemv_rows_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr,
                      M, N, K, stride_xm, k_per_split,
                      GROUP_SIZE: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr, USE_ASM: tl.constexpr,
                      PREFETCH: tl.constexpr):
    """ROWS (2, 4 or 8) rows of x against BLOCK_N columns over one split of K, two word rows a step. Each
    row has its own accumulator in gemv_h2's layout (a row axis of a 3-D tile made Triton spread the rows
    over threads, which then reloaded x and unpacked each word once per row: scripts/sass_report.py)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m0 = tl.program_id(2) * ROWS
    cols = tl.arange(0, BLOCK_N)
    offs_n = pid_n * BLOCK_N + (cols // 4) * 4 + cols % 4  # contiguous in fours: see gemv_h2's layout note
    mask_n = offs_n < N
    half = tl.arange(0, BLOCK_K // 16)
    acc0 = tl.zeros([BLOCK_K // 16, BLOCK_N], dtype=tl.float32)
    acc1, acc2, acc3, acc4, acc5, acc6, acc7 = acc0, acc0, acc0, acc0, acc0, acc0, acc0
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    if PREFETCH:
        s_n, ze_n, zo_n, wa_n, wb_n = step_words(qw_ptr, s_ptr, z_ptr, k_start, half, offs_n,
                                                 offs_n < tl.where(k_start < k_end, N, 0), N, K, GROUP_SIZE, BLOCK_K)
    for k0 in range(k_start, k_end, BLOCK_K):
        ra, rb, mask_a, mask_b = step_rows(k0, half, K, BLOCK_K)
        if PREFETCH:  # as in gemv_h2 (x, read once per row, is not prefetched)
            s, ze, zo, wa, wb = s_n, ze_n, zo_n, wa_n, wb_n
            k_next = k0 + BLOCK_K
            s_n, ze_n, zo_n, wa_n, wb_n = step_words(qw_ptr, s_ptr, z_ptr, k_next, half, offs_n,
                                                     offs_n < tl.where(k_next < k_end, N, 0), N, K, GROUP_SIZE, BLOCK_K)
        else:
            s, ze, zo, wa, wb = step_words(qw_ptr, s_ptr, z_ptr, k0, half, offs_n, mask_n, N, K, GROUP_SIZE, BLOCK_K)
        ze, zo = tl.broadcast_to(ze, wa.shape), tl.broadcast_to(zo, wa.shape)
        if USE_ASM:
            da0, da1, da2, da3 = _unpack(wa, ze, zo)  # once per word, for every row
            db0, db1, db2, db3 = _unpack(wb, ze, zo)
        else:
            da0, da1, da2, da3, db0, db1, db2, db3 = wa, wa, wa, wa, wb, wb, wb, wb  # (the twin unpacks per row)
        acc0 = _row_step(acc0, s, x_ptr, m0, M, stride_xm, perm_ptr, ra, rb, mask_a, mask_b, wa, wb, ze, zo,
                         da0, da1, da2, da3, db0, db1, db2, db3, HAS_PERM, USE_ASM)
        acc1 = _row_step(acc1, s, x_ptr, m0 + 1, M, stride_xm, perm_ptr, ra, rb, mask_a, mask_b, wa, wb, ze, zo,
                         da0, da1, da2, da3, db0, db1, db2, db3, HAS_PERM, USE_ASM)
        if ROWS > 2:
            acc2 = _row_step(acc2, s, x_ptr, m0 + 2, M, stride_xm, perm_ptr, ra, rb, mask_a, mask_b, wa, wb, ze, zo,
                             da0, da1, da2, da3, db0, db1, db2, db3, HAS_PERM, USE_ASM)
            acc3 = _row_step(acc3, s, x_ptr, m0 + 3, M, stride_xm, perm_ptr, ra, rb, mask_a, mask_b, wa, wb, ze, zo,
                             da0, da1, da2, da3, db0, db1, db2, db3, HAS_PERM, USE_ASM)
        if ROWS > 4:
            acc4 = _row_step(acc4, s, x_ptr, m0 + 4, M, stride_xm, perm_ptr, ra, rb, mask_a, mask_b, wa, wb, ze, zo,
                             da0, da1, da2, da3, db0, db1, db2, db3, HAS_PERM, USE_ASM)
            acc5 = _row_step(acc5, s, x_ptr, m0 + 5, M, stride_xm, perm_ptr, ra, rb, mask_a, mask_b, wa, wb, ze, zo,
                             da0, da1, da2, da3, db0, db1, db2, db3, HAS_PERM, USE_ASM)
            acc6 = _row_step(acc6, s, x_ptr, m0 + 6, M, stride_xm, perm_ptr, ra, rb, mask_a, mask_b, wa, wb, ze, zo,
                             da0, da1, da2, da3, db0, db1, db2, db3, HAS_PERM, USE_ASM)
            acc7 = _row_step(acc7, s, x_ptr, m0 + 7, M, stride_xm, perm_ptr, ra, rb, mask_a, mask_b, wa, wb, ze, zo,
                             da0, da1, da2, da3, db0, db1, db2, db3, HAS_PERM, USE_ASM)
    _finish(acc0, m0, ws_ptr, lock_ptr, bias_ptr, out_ptr, offs_n, mask_n, M, N, pid_n, pid_k, HAS_BIAS, SPLIT)
    _finish(acc1, m0 + 1, ws_ptr, lock_ptr, bias_ptr, out_ptr, offs_n, mask_n, M, N, pid_n, pid_k, HAS_BIAS, SPLIT)
    if ROWS > 2:
        _finish(acc2, m0 + 2, ws_ptr, lock_ptr, bias_ptr, out_ptr, offs_n, mask_n, M, N, pid_n, pid_k, HAS_BIAS, SPLIT)
        _finish(acc3, m0 + 3, ws_ptr, lock_ptr, bias_ptr, out_ptr, offs_n, mask_n, M, N, pid_n, pid_k, HAS_BIAS, SPLIT)
    if ROWS > 4:
        _finish(acc4, m0 + 4, ws_ptr, lock_ptr, bias_ptr, out_ptr, offs_n, mask_n, M, N, pid_n, pid_k, HAS_BIAS, SPLIT)
        _finish(acc5, m0 + 5, ws_ptr, lock_ptr, bias_ptr, out_ptr, offs_n, mask_n, M, N, pid_n, pid_k, HAS_BIAS, SPLIT)
        _finish(acc6, m0 + 6, ws_ptr, lock_ptr, bias_ptr, out_ptr, offs_n, mask_n, M, N, pid_n, pid_k, HAS_BIAS, SPLIT)
        _finish(acc7, m0 + 7, ws_ptr, lock_ptr, bias_ptr, out_ptr, offs_n, mask_n, M, N, pid_n, pid_k, HAS_BIAS, SPLIT)


@triton.jit
def _finish(acc, row, ws_ptr, lock_ptr, bias_ptr, out_ptr, offs_n, mask_n, M, N, pid_n, pid_k,
            HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    if row < M:
        finish_row(tl.sum(acc, axis=0) * 128.0, ws_ptr, lock_ptr, bias_ptr, out_ptr, offs_n, mask_n, row, M, N,
                   pid_n, pid_k, HAS_BIAS, SPLIT)


def gemv_rows(x: torch.Tensor, w: PackedW4, bias: torch.Tensor | None = None, cfg: Config | None = None) -> torch.Tensor:
    """x: [M, K] fp16 -> [M, N], cfg.block_m rows a program (2, 4 or 8); other dtypes take the fp32 GEMV."""
    cfg = cfg or Config("gemv_rows", 4, 64, min(128, w.group_size), 1, 4, 1)
    if cfg.block_m not in ROWS:
        raise ValueError(f"gemv_rows takes {ROWS} rows a program, got block_m={cfg.block_m}")
    if not fits(x, w, cfg):
        return gemv(x, w, bias, cfg)
    return launch_gemv(_gemv_rows_kernel, x, w, bias, cfg, rows=cfg.block_m, ROWS=cfg.block_m,
                       USE_ASM=runs_on_gpu(x), PREFETCH=cfg.num_stages >= 2)
