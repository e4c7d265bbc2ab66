"""The W4A16 GEMV for fp16 x in fp16x2 arithmetic: two weights per instruction, on the FMA units.

At M = 1 the fp32 GEMV (`gemv`) is bound by instructions per weight (a conversion and an FMA for
each), not by bytes. Here each 4-bit pair becomes an fp16x2 pair and both are multiplied at once:

    LOP3  (w & 0x000F000F) | 0x64006400        -> (1024 + q0, 1024 + q4)  (0x00F000F0: 1024 + 16 q1 ...)
    HFMA2 t * 2^-7 - (8 + z / 128)             -> (q - z) / 128, exact     (2^-11 and 0.5 for 16 q)
    HFMA2 d * (x0, x4) + acc                   -> two products at a time

The 1/128 bounds the eight products summed per fp16 half of a two-word step by 8 * 16/128 * 65504, so
no x in fp16's range overflows the sum; products below fp16's normal range lose bits only at absolute
sizes under 2^-25 * 128. Each two-word sum goes to fp32 and the scale is applied in fp32, once per
column and group. In the interleaved packing the pair a LOP3 frees, nibbles (j, j + 4), is two adjacent
channels, so each x pair is one int32 load.

Layout: the column offsets are only provably contiguous in fours, so Triton gives each thread four
columns of several word rows; the per-column work (scale, zero pairs) is then shared by those rows
instead of repeated per word. BLOCK_K spans at most one group, so scale and zero are one row per block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmctl.runtime.kernels.w4a16.common import PER_STEP, Config, block_k_for, fits_groups, runs_on_gpu
from llmctl.runtime.kernels.w4a16.gemv import finish_row, gemv, half_bits, launch_gemv, x_lanes
from llmctl.runtime.kernels.w4a16.pack import PackedW4

_WORD = """
lop3.b32 t, ${w}, 0x000F000F, 0x64006400, 0xEA;
fma.rn.f16x2 d, t, ce, $11;
{first}
lop3.b32 t, ${w}, 0x00F000F0, 0x64006400, 0xEA;
fma.rn.f16x2 d, t, co, $12;
fma.rn.f16x2 acc, d, ${x1}, acc;
shr.u32 h, ${w}, 8;
lop3.b32 t, h, 0x000F000F, 0x64006400, 0xEA;
fma.rn.f16x2 d, t, ce, $11;
fma.rn.f16x2 acc, d, ${x2}, acc;
lop3.b32 t, h, 0x00F000F0, 0x64006400, 0xEA;
fma.rn.f16x2 d, t, co, $12;
fma.rn.f16x2 acc, d, ${x3}, acc;
"""
# $1, $2: the two words; $3-$6 and $7-$10: their x pairs; $11, $12: -(8 + z/128) and -(0.5 + z/128) pairs.
_TWO_WORDS = tl.constexpr("\n".join([
    "{", ".reg .b32 t, h, d, acc, ce, co;", ".reg .b16 lo, hi;", ".reg .f32 fl, fh;",
    "mov.b32 ce, 0x20002000;", "mov.b32 co, 0x10001000;",
    _WORD.format(w=1, first="mul.rn.f16x2 acc, d, $3;", x1=4, x2=5, x3=6),
    _WORD.format(w=2, first="fma.rn.f16x2 acc, d, $7, acc;", x1=8, x2=9, x3=10),
    "mov.b32 {lo, hi}, acc;", "cvt.f32.f16 fl, lo;", "cvt.f32.f16 fh, hi;", "add.f32 $0, fl, fh;", "}"]))


@triton.jit
def _pair(lo, hi, USE_ASM: tl.constexpr):
    """Two tensors of fp16 values as the fp16x2 bits (lo, hi) of an int32 tensor."""
    lo, hi = lo.to(tl.float16), hi.to(tl.float16)
    if USE_ASM:
        return tl.inline_asm_elementwise("mov.b32 $0, {$1, $2};", "=r,h,h", [lo, hi], dtype=tl.int32, is_pure=True,
                                         pack=1)
    else:
        return (lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16)


@triton.jit
def _pair_dot(t, xp, c, zz):
    """The Triton twin of one LOP3'd pair: (t * c + zz) . xp over both halves, in fp32."""
    lo = (half_bits(t) * c + half_bits(zz)) * half_bits(xp)
    return lo + (half_bits(t >> 16) * c + half_bits(zz >> 16)) * half_bits(xp >> 16)


@triton.jit
def _word_twin(w, x04, x15, x26, x37, ze, zo):
    h = w >> 8
    return (_pair_dot((w & 0x000F000F) | 0x64006400, x04, 0.0078125, ze)
            + _pair_dot((w & 0x00F000F0) | 0x64006400, x15, 0.00048828125, zo)
            + _pair_dot((h & 0x000F000F) | 0x64006400, x26, 0.0078125, ze)
            + _pair_dot((h & 0x00F000F0) | 0x64006400, x37, 0.00048828125, zo))


@triton.jit
def _x_pairs(x_ptr, base, perm_ptr, offs_w, mask_w, HAS_PERM: tl.constexpr, USE_ASM: tl.constexpr):
    """x's channels of each word row as the fp16x2 pairs of its lanes (0, 4), (1, 5), (2, 6), (3, 7)."""
    if HAS_PERM:  # act-order: each channel gathered on its own
        x0, x1, x2, x3, x4, x5, x6, x7 = x_lanes(x_ptr, base, perm_ptr, offs_w, mask_w, HAS_PERM)
        return (_pair(x0, x4, USE_ASM)[:, None], _pair(x1, x5, USE_ASM)[:, None], _pair(x2, x6, USE_ASM)[:, None],
                _pair(x3, x7, USE_ASM)[:, None])
    else:  # lanes (j, j + 4) are adjacent channels 2c + 8j, + 1 of the word's chunk: one int32 load each
        xw = x_ptr.to(tl.pointer_type(tl.int32)) + base // 2 + 16 * (offs_w // 4) + offs_w % 4
        return (tl.load(xw, mask=mask_w, other=0)[:, None], tl.load(xw + 4, mask=mask_w, other=0)[:, None],
                tl.load(xw + 8, mask=mask_w, other=0)[:, None], tl.load(xw + 12, mask=mask_w, other=0)[:, None])


@triton.jit
def step_rows(k0, half, K, BLOCK_K: tl.constexpr):
    """A step's two word rows (BLOCK_K / 16 each) and whether they lie inside K."""
    ra = k0 // 8 + half
    rb = ra + BLOCK_K // 16
    return ra, rb, ra < K // 8, rb < K // 8


@triton.jit
def step_words(qw_ptr, s_ptr, z_ptr, k0, half, offs_n, mask_n, N, K, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """A step's two rows of words and its group's scale (fp32) and zero pairs (nothing is read where mask_n is off)."""
    g = k0 // GROUP_SIZE
    s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.uint32)[None, :]
    ze = ((z | 0xC800) * 0x10001).to(tl.int32, bitcast=True)  # fp16x2 bits of -(8 + z/128)
    zo = (((z << 4) | 0xB800) * 0x10001).to(tl.int32, bitcast=True)  # -(0.5 + z/128)
    ra, rb, mask_a, mask_b = step_rows(k0, half, K, BLOCK_K)
    wa = tl.load(qw_ptr + ra[:, None] * N + offs_n[None, :], mask=mask_a[:, None] & mask_n[None, :], other=0)
    wb = tl.load(qw_ptr + rb[:, None] * N + offs_n[None, :], mask=mask_b[:, None] & mask_n[None, :], other=0)
    return s, ze, zo, wa, wb


@triton.jit
def _step_loads(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, base, k0, k_end, half, offs_n, N, K, GROUP_SIZE: tl.constexpr,
                HAS_PERM: tl.constexpr, BLOCK_K: tl.constexpr, USE_ASM: tl.constexpr):
    """Everything a step reads: words, scale, zero pairs and x pairs (nothing for a step at or past k_end)."""
    k_live = tl.where(k0 < k_end, K, 0)
    s, ze, zo, wa, wb = step_words(qw_ptr, s_ptr, z_ptr, k0, half, offs_n, offs_n < tl.where(k0 < k_end, N, 0), N,
                                   k_live, GROUP_SIZE, BLOCK_K)
    ra, rb, mask_a, mask_b = step_rows(k0, half, k_live, BLOCK_K)
    a04, a15, a26, a37 = _x_pairs(x_ptr, base, perm_ptr, ra, mask_a, HAS_PERM, USE_ASM)
    b04, b15, b26, b37 = _x_pairs(x_ptr, base, perm_ptr, rb, mask_b, HAS_PERM, USE_ASM)
    return s, ze, zo, wa, wb, a04, a15, a26, a37, b04, b15, b26, b37


@triton.jit(do_not_specialize=PER_STEP)
def _gemv_h2_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr,
                    M, N, K, stride_xm, k_per_split,
                    GROUP_SIZE: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_ASM: tl.constexpr, PREFETCH: tl.constexpr):
    """One row of x against BLOCK_N columns over one split of K; each step takes two word rows at once.
    PREFETCH (cfg.num_stages >= 2): each step's words, scales, zeros and x are loaded one step ahead, in registers.
    Triton pipelines only loads that feed a tl.dot, so otherwise a warp waits out each step's loads, and a
    grid of a few CTAs an SM (4096 columns in 64s, split 4: two an SM) has too few warps to hide them."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    cols = tl.arange(0, BLOCK_N)
    offs_n = pid_n * BLOCK_N + (cols // 4) * 4 + cols % 4  # contiguous in fours only: see the layout note
    mask_n = offs_n < N
    half = tl.arange(0, BLOCK_K // 16)
    acc = tl.zeros([BLOCK_K // 16, BLOCK_N], dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    base = m.to(tl.int64) * stride_xm
    if PREFETCH:  # the first step's loads
        s_n, ze_n, zo_n, wa_n, wb_n, a04_n, a15_n, a26_n, a37_n, b04_n, b15_n, b26_n, b37_n = _step_loads(
            x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, base, k_start, k_end, half, offs_n, N, K, GROUP_SIZE, HAS_PERM,
            BLOCK_K, USE_ASM)
    for k0 in range(k_start, k_end, BLOCK_K):
        if PREFETCH:  # this step's words and x were loaded a step ago; load the next step's now
            s, ze, zo, wa, wb = s_n, ze_n, zo_n, wa_n, wb_n
            a04, a15, a26, a37, b04, b15, b26, b37 = a04_n, a15_n, a26_n, a37_n, b04_n, b15_n, b26_n, b37_n
            s_n, ze_n, zo_n, wa_n, wb_n, a04_n, a15_n, a26_n, a37_n, b04_n, b15_n, b26_n, b37_n = _step_loads(
                x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, base, k0 + BLOCK_K, k_end, half, offs_n, N, K, GROUP_SIZE,
                HAS_PERM, BLOCK_K, USE_ASM)
        else:
            s, ze, zo, wa, wb, a04, a15, a26, a37, b04, b15, b26, b37 = _step_loads(
                x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, base, k0, k_end, half, offs_n, N, K, GROUP_SIZE, HAS_PERM,
                BLOCK_K, USE_ASM)
        if USE_ASM:
            shape: tl.constexpr = [BLOCK_K // 16, BLOCK_N]
            part = tl.inline_asm_elementwise(
                _TWO_WORDS, "=f,r,r,r,r,r,r,r,r,r,r,r,r",
                [wa, wb, tl.broadcast_to(a04, shape), tl.broadcast_to(a15, shape), tl.broadcast_to(a26, shape),
                 tl.broadcast_to(a37, shape), tl.broadcast_to(b04, shape), tl.broadcast_to(b15, shape),
                 tl.broadcast_to(b26, shape), tl.broadcast_to(b37, shape), tl.broadcast_to(ze, shape),
                 tl.broadcast_to(zo, shape)], dtype=tl.float32, is_pure=True, pack=1)
        else:  # Triton's interpreter: the same bits and constants in plain Triton, summed in fp32
            part = _word_twin(wa, a04, a15, a26, a37, ze, zo) + _word_twin(wb, b04, b15, b26, b37, ze, zo)
        acc += s * part
    finish_row(tl.sum(acc, axis=0) * 128.0, ws_ptr, lock_ptr, bias_ptr, out_ptr, offs_n, mask_n, m, M, N, pid_n,
               pid_k, HAS_BIAS, SPLIT)


def block_k_h2(group_size: int) -> int | None:
    """The largest block this kernel can take for the groups: inside one group, at most 128."""
    return block_k_for(group_size, min(128, group_size))


def fits(x: torch.Tensor, w: PackedW4, cfg: Config) -> bool:
    """fp16 x with 4-byte aligned rows (read as channel pairs), blocks of whole 32-channel chunks in one group."""
    return (x.dtype == torch.float16 and x.data_ptr() % 4 == 0 and (x.shape[0] <= 1 or x.stride(0) % 2 == 0)
            and cfg.block_k <= w.group_size and fits_groups(cfg.block_k, w.group_size))


def gemv_h2(x: torch.Tensor, w: PackedW4, bias: torch.Tensor | None = None, cfg: Config | None = None) -> torch.Tensor:
    """x: [M, K] fp16 -> [M, N]; where `fits` says no (other dtypes, odd alignment), the fp32 GEMV runs."""
    cfg = cfg or Config("gemv_h2", 1, 128, block_k_h2(w.group_size) or 16, 1, 4, 1)
    if not fits(x, w, cfg):
        return gemv(x, w, bias, cfg)
    return launch_gemv(_gemv_h2_kernel, x, w, bias, cfg, USE_ASM=runs_on_gpu(x), PREFETCH=cfg.num_stages >= 2)
