"""W4A16 Triton kernels: y = x @ dequant(W).T for the int4 layout of `w4a16_pack` (fp16 / bf16 / fp32 x).

Three ways to compute it; `w4a16_dispatch` picks one per shape (and GPU) by timing them:

- `gemv`: small M (decode). No tensor cores: each program dots BLOCK_K channels of one row of x with
  BLOCK_N columns, in fp32. At M = 1 the GEMV is bound by instructions per weight, not bytes, so the
  inner product of a packed word with its eight x values is a few lines of PTX (about 3 instructions
  per weight; Triton's own code for the same math took 5.5 to 6.5). Split-K spreads the K loop over
  more programs, so a 4096-wide layer still fills every SM; the last split of each column block to
  finish adds the partial sums up, so no second kernel is launched.
- `tiled`: medium M, on tensor cores, computed as (W.T @ x.T).T: the dequantized weight tile is the
  MMA's first operand (Hopper's wgmma reads it from registers) and x.T its second, so as few as 16 rows
  of x cost no extra weight traffic and each block is one full-K dot. Split-K as for the GEMV, summed by
  a small second kernel.
- `dequant_mm`: large M, where the GEMM is compute-bound: dequantize the whole weight once and let
  cuBLAS do the matmul.

Both kernels read a tile of packed words [BLOCK_K/8, BLOCK_N] once and unpack each word's eight nibble
lanes in registers (LOP3 with the fp16 magic number 0x6400, in PTX where the GPU runs them), so every
weight byte is loaded exactly once. The tiled and dense paths dequantize a weight exactly as the
reference does: (code - zero) * scale rounded once to x's dtype (fp16 products of those operands are
exact before rounding; bf16 goes through fp32 because the scales are fp16). The GEMV keeps code - zero
exact and applies the scale in fp32 to each word's sum: it rounds less than the reference, never more.
Triton's interpreter (CPU tests) runs the same math in plain Triton instead of the PTX.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from llmctl.runtime.kernels.w4a16_pack import PackedW4

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Config:
    """One launch configuration. kind: gemv | tiled | dense (dequantize + cuBLAS)."""

    kind: str
    block_m: int = 1
    block_n: int = 128
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2


@triton.jit
def _dequant(words, j, zf, s, DTYPE: tl.constexpr):
    """Nibble j of the words (a constant, or one shift per row), dequantized. 0x6400 | q is the fp16
    1024 + q: no int-to-float conversion (a quarter-rate instruction) on the hot path. zf is 1024 + zero,
    so the difference is the exact q - z."""
    bits = ((words >> (4 * j)) & 0xF) | 0x6400
    d = bits.to(tl.int16).to(tl.float16, bitcast=True) - zf
    if tl.float16 == DTYPE:
        return d * s
    else:
        return (d.to(tl.float32) * s.to(tl.float32)).to(DTYPE)


@triton.jit
def _scale_zero(s_ptr, z_ptr, k0, offs_w, mask_w, offs_n, mask_n, N, GROUP_SIZE: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """Scales and 1024 + zeros of a block's channels: one row when the block sits inside a group, else one
    row per word row (the eight channels of a word always share a group: groups are multiples of 8)."""
    if BLOCK_K <= GROUP_SIZE:
        g = k0 // GROUP_SIZE
        s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0)[None, :]
        z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0)[None, :]
    else:
        g = (offs_w * 8) // GROUP_SIZE  # [BLOCK_K/8]
        mask = mask_w[:, None] & mask_n[None, :]
        s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
        z = tl.load(z_ptr + g[:, None] * N + offs_n[None, :], mask=mask, other=0)
    return s, z.to(tl.float16) + 1024.0


def _word_dot_ptx() -> str:
    """One packed word against its eight x values, as PTX: (w & 0x000F000F) | 0x64006400 is the fp16 pair
    (1024 + q0, 1024 + q4) and the 0x00F000F0 mask gives (1024 + 16 q1, 1024 + 16 q5), so one shift by 8
    and four LOP3s free all eight codes, each converted to fp32 by one instruction and multiplied by its x
    (x1, x3, x5, x7 arrive divided by 16). $10 starts the sum, so the caller folds the 1024 offsets and the
    zero point into it: about 3 instructions per weight instead of ~10 in plain Triton."""
    lines = ["{", ".reg .b32 t, h;", ".reg .b16 a, b;", ".reg .f32 fa, fb;"]
    for i, mask in enumerate(("0x000F000F", "0x00F000F0", "0x000F000F", "0x00F000F0")):
        if i == 2:
            lines.append("shr.u32 h, $1, 8;")
        start = "$10" if i == 0 else "$0"
        lines += [f"lop3.b32 t, {'$1' if i < 2 else 'h'}, {mask}, 0x64006400, 0xEA;", "mov.b32 {a, b}, t;",
                  "cvt.f32.f16 fa, a;", "cvt.f32.f16 fb, b;", f"fma.rn.f32 $0, fa, ${2 + 2 * i}, {start};",
                  f"fma.rn.f32 $0, fb, ${3 + 2 * i}, $0;"]
    return "\n" + "\n".join(lines + ["}"]) + "\n"


_WORD_DOT = tl.constexpr(_word_dot_ptx())


@triton.jit
def _half(bits):
    """The fp16 in the low 16 bits of an int32, as fp32."""
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _word_dot(words, x0, x4, x1, x5, x2, x6, x3, x7, init, USE_ASM: tl.constexpr):
    """init + sum_j x_j * (1024 + c_j q_j), c_j = 1 for lanes 0, 2, 4, 6 and 16 for the others (whose x
    the caller divides by 16). The Triton twin computes the same sums for Triton's interpreter."""
    if USE_ASM:
        return tl.inline_asm_elementwise(_WORD_DOT, "=f,r,f,f,f,f,f,f,f,f,f", [words, x0, x4, x1, x5, x2, x6, x3, x7, init],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        acc = init
        for shift in tl.static_range(0, 16, 8):
            lo = ((words >> shift) & 0x000F000F) | 0x64006400
            hi = ((words >> shift) & 0x00F000F0) | 0x64006400
            if shift == 0:
                acc += _half(lo) * x0 + _half(lo >> 16) * x4 + _half(hi) * x1 + _half(hi >> 16) * x5
            else:
                acc += _half(lo) * x2 + _half(lo >> 16) * x6 + _half(hi) * x3 + _half(hi >> 16) * x7
        return acc


@triton.jit
def _x_lane(x_ptr, base, perm_ptr, offs_w, mask_w, j: tl.constexpr, HAS_PERM: tl.constexpr):
    chan = offs_w * 8 + j
    if HAS_PERM:
        chan = tl.load(perm_ptr + chan, mask=mask_w, other=0)
    return tl.load(x_ptr + base + chan, mask=mask_w, other=0.0).to(tl.float32)


@triton.jit
def _gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr,
                 M, N, K, stride_xm, k_per_split,
                 GROUP_SIZE: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_ASM: tl.constexpr, EXACT: tl.constexpr):
    """One row of x against BLOCK_N columns over one split of K, on the FMA units (no tensor cores).

    Per packed word: sum_j x_j (q_j - z) = word_dot - (1024 sum_j x_j / c_j + z sum_j x_j), then one
    FMA with the group's scale. EXACT (fp32 x) subtracts the offsets per weight instead, so the
    products are exact as the reference's are. With SPLIT > 1 each split stores its partial sums and
    the last split of a column block to finish (counted on lock_ptr) adds them up: no second kernel.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    dtype = x_ptr.dtype.element_ty
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = tl.arange(0, BLOCK_K // 8)
    acc = tl.zeros([BLOCK_K // 8, BLOCK_N], dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    base = m.to(tl.int64) * stride_xm
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_w = k0 // 8 + rows
        mask_w = offs_w < K // 8
        words = tl.load(qw_ptr + offs_w[:, None] * N + offs_n[None, :], mask=mask_w[:, None] & mask_n[None, :],
                        other=0)  # [BLOCK_K/8, BLOCK_N]
        s, zf = _scale_zero(s_ptr, z_ptr, k0, offs_w, mask_w, offs_n, mask_n, N, GROUP_SIZE, BLOCK_K)
        s = s.to(tl.float32)
        z = zf.to(tl.float32) - 1024.0
        x0 = _x_lane(x_ptr, base, perm_ptr, offs_w, mask_w, 0, HAS_PERM)
        x1 = _x_lane(x_ptr, base, perm_ptr, offs_w, mask_w, 1, HAS_PERM)
        x2 = _x_lane(x_ptr, base, perm_ptr, offs_w, mask_w, 2, HAS_PERM)
        x3 = _x_lane(x_ptr, base, perm_ptr, offs_w, mask_w, 3, HAS_PERM)
        x4 = _x_lane(x_ptr, base, perm_ptr, offs_w, mask_w, 4, HAS_PERM)
        x5 = _x_lane(x_ptr, base, perm_ptr, offs_w, mask_w, 5, HAS_PERM)
        x6 = _x_lane(x_ptr, base, perm_ptr, offs_w, mask_w, 6, HAS_PERM)
        x7 = _x_lane(x_ptr, base, perm_ptr, offs_w, mask_w, 7, HAS_PERM)
        x_sum = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
        if EXACT:  # fp32 x: (q - z) exactly, then exact products, as the reference
            part = tl.zeros([BLOCK_K // 8, BLOCK_N], dtype=tl.float32)
            for j in tl.static_range(8):
                xj = _x_lane(x_ptr, base, perm_ptr, offs_w, mask_w, j, HAS_PERM)
                q = ((words >> (4 * j)) & 0xF).to(tl.float32)
                part += (q - z) * xj[:, None]
        else:
            x1, x3, x5, x7 = x1 * 0.0625, x3 * 0.0625, x5 * 0.0625, x7 * 0.0625
            offset = 1024.0 * (((x0 + x2) + (x4 + x6)) + ((x1 + x3) + (x5 + x7)))  # [BLOCK_K/8]
            init = -(offset[:, None] + z * x_sum[:, None])
            part = _word_dot(words, x0[:, None], x4[:, None], x1[:, None], x5[:, None], x2[:, None], x6[:, None],
                             x3[:, None], x7[:, None], init, USE_ASM)
        acc += s * part
    out = tl.sum(acc, axis=0)
    if SPLIT > 1:
        tile = m * tl.num_programs(0) + pid_n
        tl.store(ws_ptr + (pid_k * M + m.to(tl.int64)) * N + offs_n, out, mask=mask_n)
        tl.debug_barrier()  # every thread's partial sums are out before the count goes up
        if tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel") == SPLIT - 1:  # the last split sums them
            out = tl.zeros([BLOCK_N], dtype=tl.float32)
            for i in tl.static_range(SPLIT):
                out += tl.load(ws_ptr + (i * M + m.to(tl.int64)) * N + offs_n, mask=mask_n, other=0.0,
                               cache_modifier=".cg")
            if HAS_BIAS:
                out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            tl.store(out_ptr + m.to(tl.int64) * N + offs_n, out.to(dtype), mask=mask_n)
            tl.atomic_xchg(lock_ptr + tile, 0)  # ready for the next launch
    else:
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(out_ptr + m.to(tl.int64) * N + offs_n, out.to(dtype), mask=mask_n)


def _word_dequant_ptx() -> str:
    """Eight weights of one packed word dequantized in PTX: each LOP3 makes the fp16 pair (1024 + q_j,
    1024 + q_j+4); one f16x2 subtract of 1024 + z ($9), exact, and one f16x2 multiply by the scale ($10),
    rounded once as the reference rounds it, give two weights. Outputs $0..$7 are lanes 0..7 of word $8."""
    lines = ["{", ".reg .b32 t, h, z2, s2;", "mov.b32 z2, {$9, $9};", "mov.b32 s2, {$10, $10};"]
    for j in range(4):
        if j:
            lines.append(f"shr.u32 h, $8, {4 * j};")
        lines += [f"lop3.b32 t, {'h' if j else '$8'}, 0x000F000F, 0x64006400, 0xEA;", "sub.f16x2 t, t, z2;",
                  "mul.f16x2 t, t, s2;", f"mov.b32 {{${j}, ${j + 4}}}, t;"]
    return "\n" + "\n".join(lines + ["}"]) + "\n"


_WORD_DEQUANT = tl.constexpr(_word_dequant_ptx())


@triton.jit
def _join8(w0, w1, w2, w3, w4, w5, w6, w7, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Eight [ROWS, COLS] lanes -> [ROWS, COLS * 8] with lane j of column c at column 8c + j (in registers:
    each thread holds all eight lanes of its words)."""
    a = tl.join(tl.join(tl.join(w0, w1), tl.join(w2, w3)), tl.join(tl.join(w4, w5), tl.join(w6, w7)))
    return tl.reshape(tl.permute(a, (0, 1, 4, 3, 2)), [ROWS, COLS * 8])  # [.., p, q, h] is lane 4h + 2q + p


@triton.jit
def _tiled_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, bias_ptr, out_ptr, ws_ptr,
                  M, N, K, stride_xm, k_per_split,
                  GROUP_SIZE: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
                  USE_ASM: tl.constexpr):
    """out.T = W.T @ x.T: the dequantized weight tile is the MMA's first operand [BLOCK_N, BLOCK_K], held
    in registers, and x.T its second, so BLOCK_M rows of x may be as few as 16 at no cost in weight
    traffic, and each block is one full-K dot."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % num_m  # M tiles vary fastest: neighbours share (and L2 keeps) one weight tile
    pid_n = pid // num_m
    dtype = x_ptr.dtype.element_ty
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    mask_m = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = tl.arange(0, BLOCK_K // 8)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_w = k0 // 8 + rows
        mask_w = offs_w < K // 8
        words = tl.load(qw_ptr + offs_w[None, :] * N + offs_n[:, None], mask=mask_n[:, None] & mask_w[None, :],
                        other=0)  # [BLOCK_N, BLOCK_K/8]
        s, zf = _scale_zero(s_ptr, z_ptr, k0, offs_w, mask_w, offs_n, mask_n, N, GROUP_SIZE, BLOCK_K)
        s, zf = tl.trans(s), tl.trans(zf)
        if USE_ASM:  # fp16 x on a GPU: all eight lanes of a word in ~2 instructions per weight
            w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
                _WORD_DEQUANT, "=h,=h,=h,=h,=h,=h,=h,=h,r,h,h",
                [words, tl.broadcast_to(zf, words.shape), tl.broadcast_to(s, words.shape)],
                dtype=(tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16,
                       tl.float16), is_pure=True, pack=1)
        else:
            w0, w1 = _dequant(words, 0, zf, s, dtype), _dequant(words, 1, zf, s, dtype)
            w2, w3 = _dequant(words, 2, zf, s, dtype), _dequant(words, 3, zf, s, dtype)
            w4, w5 = _dequant(words, 4, zf, s, dtype), _dequant(words, 5, zf, s, dtype)
            w6, w7 = _dequant(words, 6, zf, s, dtype), _dequant(words, 7, zf, s, dtype)
        w = _join8(w0, w1, w2, w3, w4, w5, w6, w7, BLOCK_N, BLOCK_K // 8)  # [BLOCK_N, BLOCK_K]
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        chan = offs_k
        if HAS_PERM:
            chan = tl.load(perm_ptr + offs_k, mask=mask_k, other=0)
        xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + chan[:, None], mask=mask_k[:, None] & mask_m[None, :],
                     other=0.0)  # [BLOCK_K, BLOCK_M]
        if DOT_FP32:
            acc += tl.dot(w.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(w, xt, acc)
    mask = mask_n[:, None] & mask_m[None, :]
    if SPLIT:
        tl.store(ws_ptr + (pid_k * M + offs_m[None, :]) * N + offs_n[:, None], acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + offs_m[None, :] * N + offs_n[:, None], acc.to(dtype), mask=mask)


@triton.jit
def _splitk_reduce_kernel(ws_ptr, bias_ptr, out_ptr, MN, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_kernel(qw_ptr, s_ptr, z_ptr, perm_ptr, w_ptr, N, K,
                    GROUP_SIZE: tl.constexpr, HAS_PERM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W [K, N] in the checkpoint's channel order (packed row k goes to row perm[k])."""
    offs_w = tl.program_id(0) * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_w, mask_n = offs_w < K // 8, offs_n < N
    words = tl.load(qw_ptr + offs_w[:, None] * N + offs_n[None, :], mask=mask_w[:, None] & mask_n[None, :], other=0)
    k0 = tl.program_id(0) * BLOCK_K
    s, zf = _scale_zero(s_ptr, z_ptr, k0, offs_w, mask_w, offs_n, mask_n, N, GROUP_SIZE, BLOCK_K)
    for j in tl.static_range(8):
        w = _dequant(words, j, zf, s, w_ptr.dtype.element_ty)
        dest = offs_w * 8 + j
        if HAS_PERM:
            dest = tl.load(perm_ptr + dest, mask=mask_w, other=0)
        tl.store(w_ptr + dest.to(tl.int64)[:, None] * N + offs_n[None, :], w, mask=mask_w[:, None] & mask_n[None, :])


# -- wrappers ------------------------------------------------------------------------------------


def check_args(x: torch.Tensor, w: PackedW4, bias: torch.Tensor | None) -> None:
    """Shapes, dtypes, devices and strides, checked before any launch."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be 2-D [M, K] with contiguous rows, got shape {tuple(x.shape)} strides {x.stride()}")
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.shape[1] != w.in_features:
        raise ValueError(f"x has {x.shape[1]} input features, the weight {w.in_features}")
    if not (w.qweight.is_contiguous() and w.scales.is_contiguous() and w.zeros.is_contiguous()):
        raise ValueError("packed weight tensors must be contiguous")
    tensors = [w.qweight, w.scales, w.zeros] + ([w.perm] if w.perm is not None else [])
    if bias is not None:
        if bias.shape != (w.out_features,) or bias.dtype != x.dtype or not bias.is_contiguous():
            raise ValueError(f"bias must be contiguous [{w.out_features}] of {x.dtype}, got {tuple(bias.shape)} "
                             f"{bias.dtype}")
        tensors.append(bias)
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"x is on {x.device} but the weight is on {w.qweight.device}")


def _check_blocks(cfg: Config, w: PackedW4) -> None:
    if cfg.block_k % 8 or cfg.block_k < 16 or (cfg.block_k > w.group_size and cfg.block_k % w.group_size):
        raise ValueError(f"block_k {cfg.block_k} must be a multiple of 16 and sit inside or span whole groups "
                         f"of {w.group_size}")


def _launch(kernel, grid, x, w: PackedW4, bias, cfg: Config, **blocks) -> torch.Tensor:
    m, n, k = x.shape[0], w.out_features, w.in_features
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    # Each split gets whole BLOCK_K steps; a split past K does nothing but still writes its zeros.
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    split = cfg.split_k > 1
    ws = torch.empty(cfg.split_k, m, n, dtype=torch.float32, device=x.device) if split else out
    perm = w.perm if w.perm is not None else w.qweight
    kernel[grid(m, n)](x, w.qweight, w.scales, w.zeros, perm, bias if bias is not None else out, out, ws,
                       m, n, k, x.stride(0), k_per_split, GROUP_SIZE=w.group_size, HAS_PERM=w.perm is not None,
                       HAS_BIAS=bias is not None, SPLIT=split, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                       num_warps=cfg.num_warps, num_stages=cfg.num_stages, **blocks)
    if split:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](ws, bias if bias is not None else out, out, m * n, n,
                                                            SPLIT_K=cfg.split_k, HAS_BIAS=bias is not None,
                                                            BLOCK=block, num_warps=4)
    return out


_LOCKS: dict[torch.device, torch.Tensor] = {}


def _locks(device: torch.device, n: int) -> torch.Tensor:
    """Split-K arrival counters, zero between launches (the last split of a tile resets its own). One
    buffer per device serves every launch: launches on one stream run one after the other."""
    locks = _LOCKS.get(device)
    if locks is None or locks.numel() < n:
        locks = _LOCKS[device] = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device)
    return locks


def gemv(x: torch.Tensor, w: PackedW4, bias: torch.Tensor | None = None, cfg: Config | None = None) -> torch.Tensor:
    """x: [M, K] -> [M, N], one program row per row of x (meant for M of a few)."""
    cfg = cfg or Config("gemv", 1, 128, 128)
    check_args(x, w, bias)
    _check_blocks(cfg, w)
    m, n, k = x.shape[0], w.out_features, w.in_features
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    tiles_n = triton.cdiv(n, cfg.block_n)
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    split = min(cfg.split_k, triton.cdiv(k, k_per_split))  # no split without work: it would never arrive
    capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
    if split > 1 and capturing and (x.device not in _LOCKS or _LOCKS[x.device].numel() < m * tiles_n):
        split, k_per_split = 1, triton.cdiv(k, cfg.block_k) * cfg.block_k  # counters cannot be made mid-capture
    ws = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else out
    locks = _locks(x.device, m * tiles_n) if split > 1 else out
    interpreted = os.environ.get("TRITON_INTERPRET") == "1" or x.device.type != "cuda"
    _gemv_kernel[(tiles_n, split, m)](
        x, w.qweight, w.scales, w.zeros, w.perm if w.perm is not None else w.qweight,
        bias if bias is not None else out, out, ws, locks, m, n, k, x.stride(0), k_per_split,
        GROUP_SIZE=w.group_size, HAS_PERM=w.perm is not None, HAS_BIAS=bias is not None, SPLIT=split,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, USE_ASM=not interpreted, EXACT=x.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def tiled(x: torch.Tensor, w: PackedW4, bias: torch.Tensor | None = None, cfg: Config | None = None) -> torch.Tensor:
    """x: [M, K] -> [M, N] as (W.T @ x.T).T: tiles of cfg.block_n weight columns on the MMA's first operand
    (64 or more for Hopper's wgmma), cfg.block_m (>= 16) rows of x on its second."""
    cfg = cfg or Config("tiled", 16, 64, 128)
    check_args(x, w, bias)
    _check_blocks(cfg, w)
    if cfg.block_m < 16 or cfg.block_n < 16:
        raise ValueError(f"tiled needs block_m and block_n >= 16, got {cfg}")

    def grid(m, n):
        return (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k)

    # fp32 x wants exact fp32 products, not TF32; Triton's interpreter gets bf16 tl.dot wrong (3.9), so
    # there bf16 tiles are multiplied in fp32 too: the same products, accumulated in fp32 either way.
    dot_fp32 = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")
    use_asm = x.dtype == torch.float16 and x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"
    return _launch(_tiled_kernel, grid, x, w, bias, cfg, BLOCK_M=cfg.block_m, DOT_FP32=dot_fp32, USE_ASM=use_asm)


def dequantize(w: PackedW4, dtype: torch.dtype, block_n: int = 128, block_k: int = 128) -> torch.Tensor:
    """W: [K, N] of dtype, in the checkpoint's channel order (the large-M path's first half)."""
    k, n = w.in_features, w.out_features
    _check_blocks(Config("dense", block_n=block_n, block_k=block_k), w)
    out = torch.empty(k, n, dtype=dtype, device=w.qweight.device)
    perm = w.perm if w.perm is not None else w.qweight
    _dequant_kernel[(triton.cdiv(k, block_k), triton.cdiv(n, block_n))](
        w.qweight, w.scales, w.zeros, perm, out, n, k, GROUP_SIZE=w.group_size, HAS_PERM=w.perm is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out


def dequant_mm(x: torch.Tensor, w: PackedW4, bias: torch.Tensor | None = None, cfg: Config | None = None) -> torch.Tensor:
    """Dequantize to x's dtype, then cuBLAS: where M is large enough, the GEMM hides the extra pass."""
    check_args(x, w, bias)
    dense = dequantize(w, x.dtype)  # [K, N]
    return torch.addmm(bias, x, dense) if bias is not None else torch.mm(x, dense)


PATHS = {"gemv": gemv, "tiled": tiled, "dense": dequant_mm}
