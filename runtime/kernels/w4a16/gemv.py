"""The W4A16 GEMV for small M (decode) on the FMA units; see `w4a16` for the overview."""

from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl

from llmctl.runtime.kernels.compiling import start
from llmctl.runtime.kernels.splitk import counters
from llmctl.runtime.kernels.w4a16.common import (
    PER_STEP,
    Config,
    check_args,
    check_blocks,
    k_per_split,
    lane_channel,
    runs_on_gpu,
    scale_zero,
)
from llmctl.runtime.kernels.w4a16.pack import PackedW4


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
def half_bits(bits):
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
                acc += half_bits(lo) * x0 + half_bits(lo >> 16) * x4 + half_bits(hi) * x1 + half_bits(hi >> 16) * x5
            else:
                acc += half_bits(lo) * x2 + half_bits(lo >> 16) * x6 + half_bits(hi) * x3 + half_bits(hi >> 16) * x7
        return acc


@triton.jit
def _x_lane(x_ptr, base, perm_ptr, offs_w, mask_w, j: tl.constexpr, HAS_PERM: tl.constexpr):
    chan = lane_channel(offs_w, j)
    if HAS_PERM:
        chan = tl.load(perm_ptr + chan, mask=mask_w, other=0)
    return tl.load(x_ptr + base + chan, mask=mask_w, other=0.0).to(tl.float32)


@triton.jit
def x_lanes(x_ptr, base, perm_ptr, offs_w, mask_w, HAS_PERM: tl.constexpr):
    """x's channels of each word row's eight lanes (interleaved packing), lane by lane, in fp32."""
    return (_x_lane(x_ptr, base, perm_ptr, offs_w, mask_w, 0, HAS_PERM),
            _x_lane(x_ptr, base, perm_ptr, offs_w, mask_w, 1, HAS_PERM),
            _x_lane(x_ptr, base, perm_ptr, offs_w, mask_w, 2, HAS_PERM),
            _x_lane(x_ptr, base, perm_ptr, offs_w, mask_w, 3, HAS_PERM),
            _x_lane(x_ptr, base, perm_ptr, offs_w, mask_w, 4, HAS_PERM),
            _x_lane(x_ptr, base, perm_ptr, offs_w, mask_w, 5, HAS_PERM),
            _x_lane(x_ptr, base, perm_ptr, offs_w, mask_w, 6, HAS_PERM),
            _x_lane(x_ptr, base, perm_ptr, offs_w, mask_w, 7, HAS_PERM))


@triton.jit
def _exact(words, j: tl.constexpr, z, xj):
    """(q_j - z) * x_j in fp32 for lane j: exact products, for fp32 x."""
    return (((words >> (4 * j)) & 0xF).to(tl.float32) - z) * xj[:, None]


@triton.jit(do_not_specialize=PER_STEP)
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
        s, zf = scale_zero(s_ptr, z_ptr, k0, offs_w, mask_w, offs_n, mask_n, N, GROUP_SIZE, BLOCK_K)
        s = s.to(tl.float32)
        z = zf.to(tl.float32) - 1024.0
        x0, x1, x2, x3, x4, x5, x6, x7 = x_lanes(x_ptr, base, perm_ptr, offs_w, mask_w, HAS_PERM)
        if EXACT:  # fp32 x: (q - z) exactly, then exact products, as the reference
            part = (_exact(words, 0, z, x0) + _exact(words, 1, z, x1) + _exact(words, 2, z, x2)
                    + _exact(words, 3, z, x3) + _exact(words, 4, z, x4) + _exact(words, 5, z, x5)
                    + _exact(words, 6, z, x6) + _exact(words, 7, z, x7))
        else:
            x_sum = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
            x1, x3, x5, x7 = x1 * 0.0625, x3 * 0.0625, x5 * 0.0625, x7 * 0.0625
            offset = 1024.0 * (((x0 + x2) + (x4 + x6)) + ((x1 + x3) + (x5 + x7)))  # [BLOCK_K/8]
            init = -(offset[:, None] + z * x_sum[:, None])
            part = _word_dot(words, x0[:, None], x4[:, None], x1[:, None], x5[:, None], x2[:, None], x6[:, None],
                             x3[:, None], x7[:, None], init, USE_ASM)
        acc += s * part
    finish_row(tl.sum(acc, axis=0), ws_ptr, lock_ptr, bias_ptr, out_ptr, offs_n, mask_n, m, M, N, pid_n, pid_k,
               HAS_BIAS, SPLIT)


@triton.jit
def finish_row(out, ws_ptr, lock_ptr, bias_ptr, out_ptr, offs_n, mask_n, m, M, N, pid_n, pid_k,
               HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """Store one row's fp32 sums over this program's split of K: with SPLIT > 1 each split stores its
    partial sums and the last split of a column block to finish (counted on lock_ptr) adds them up."""
    dtype = out_ptr.dtype.element_ty
    if SPLIT > 1:
        tile = m * tl.num_programs(0) + pid_n
        tl.store(ws_ptr + (pid_k * M + m.to(tl.int64)) * N + offs_n, out, mask=mask_n)
        tl.debug_barrier()  # every thread's partial sums are out before the count goes up
        if tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel") == SPLIT - 1:  # the last split sums them
            out = tl.zeros([out.shape[0]], dtype=tl.float32)
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


def gemv(x: torch.Tensor, w: PackedW4, bias: torch.Tensor | None = None, cfg: Config | None = None) -> torch.Tensor:
    """x: [M, K] -> [M, N], one program row per row of x (meant for M of a few)."""
    cfg = cfg or Config("gemv", 1, 128, 128)
    return launch_gemv(_gemv_kernel, x, w, bias, cfg, USE_ASM=runs_on_gpu(x), EXACT=x.dtype == torch.float32)


def launch_gemv(kernel, x: torch.Tensor, w: PackedW4, bias: torch.Tensor | None, cfg: Config, rows: int = 1,
                **consts) -> torch.Tensor:
    """Launch a GEMV kernel on a (column block, split of K, `rows` rows of x) grid, with its split-K counters
    (one per row and column block)."""
    check_args(x, w, bias)
    check_blocks(cfg, w)
    m, n, k = x.shape[0], w.out_features, w.in_features
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    tiles_n = triton.cdiv(n, cfg.block_n)
    per_split = k_per_split(k, cfg)
    split = min(cfg.split_k, triton.cdiv(k, per_split))  # no split without work: it would never arrive
    locks = counters(x, m * tiles_n) if split > 1 else out
    if locks is None:  # none can be made mid-capture: no split
        split, per_split, locks = 1, k_per_split(k, replace(cfg, split_k=1)), out
    ws = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else out
    start(kernel, (tiles_n, split, triton.cdiv(m, rows)),
          x, w.qweight, w.scales, w.zeros, w.perm if w.perm is not None else w.qweight,
          bias if bias is not None else out, out, ws, locks, m, n, k, x.stride(0), per_split,
          GROUP_SIZE=w.group_size, HAS_PERM=w.perm is not None, HAS_BIAS=bias is not None, SPLIT=split,
          BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **consts)
    return out
