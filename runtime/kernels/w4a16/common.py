"""What the W4A16 paths share: launch configurations, argument checks, the in-register dequantization
of a packed word (PTX on a GPU, its Triton twin under the interpreter) and its group's scale and zero,
the tensor-core kernels' epilogue and split-K summing, and the dequantize + cuBLAS path."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from llmctl.runtime.kernels.compiling import start
from llmctl.runtime.kernels.w4a16.pack import PackedW4
from llmctl.runtime.kernels.w4a16.pack import dequantize as dequantize_ref

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The kernels' argument that changes from step to step: M, the rows of x. Triton compiles one variant per
# divisibility of each integer argument (by 16, or equal to 1), and start-up tuning runs only powers of two,
# so the first prefill chunk of, say, 1,000 tokens in a bucket compiled a new variant mid-run, a stall of
# every request. M only bounds masks and row offsets (no vectorized access depends on it): not specializing
# on it costs nothing.
PER_STEP = ["M"]


KINDS = ("gemv", "gemv_h2", "gemv_rows", "tiled", "dense")


@dataclass(frozen=True)
class Config:
    """One launch configuration. kind: one of KINDS (dense: dequantize + cuBLAS); block_m: rows of x a program
    takes (gemv_rows, tiled)."""

    kind: str
    block_m: int = 1
    block_n: int = 128
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2


@triton.jit
def lane_channel(r, j):
    """The channel held by nibble j of word row r in the interleaved packing (`pack`): word 4i + c
    of a 32-channel chunk holds channels 2c + 8(j % 4) + j // 4 of it."""
    return 32 * (r // 4) + 2 * (r % 4) + 8 * (j % 4) + j // 4


@triton.jit
def dequant_lane(words, j, zf, s, DTYPE: tl.constexpr):
    """Nibble j of the words (a constant, or one shift per row), dequantized. 0x6400 | q is the fp16
    1024 + q: no int-to-float conversion (a quarter-rate instruction) on the hot path. zf is 1024 + zero,
    so the difference is the exact q - z."""
    bits = ((words >> (4 * j)) & 0xF) | 0x6400
    d = bits.to(tl.int16).to(tl.float16, bitcast=True) - zf
    if tl.float16 == DTYPE:
        return d * s
    else:
        return (d.to(tl.float32) * s.to(tl.float32)).to(DTYPE)


def _word_dequant_ptx(bf16: bool) -> str:
    """Eight weights of one packed word dequantized in PTX: each LOP3 makes the fp16 pair (1024 + q_j,
    1024 + q_j+4) and one f16x2 subtract of 1024 + z ($9) leaves q - z, exact. fp16: one f16x2 multiply
    by the scale ($10) rounds each product once, as the reference does. bf16: the products are taken in
    fp32 (exact: a 5-bit integer times an fp16 scale) and rounded once to bf16, as the reference does.
    Outputs $0..$7 are lanes 0..7 of word $8."""
    lines = ["{", ".reg .b32 t, h, z2, s2;"]
    lines += [".reg .b16 a, b;", ".reg .f32 fa, fb;", "mov.b32 z2, {$9, $9};"] if bf16 else \
        ["mov.b32 z2, {$9, $9};", "mov.b32 s2, {$10, $10};"]
    for j in range(4):
        if j:
            lines.append(f"shr.u32 h, $8, {4 * j};")
        lines += [f"lop3.b32 t, {'h' if j else '$8'}, 0x000F000F, 0x64006400, 0xEA;", "sub.f16x2 t, t, z2;"]
        if bf16:
            lines += ["mov.b32 {a, b}, t;", "cvt.f32.f16 fa, a;", "cvt.f32.f16 fb, b;", "mul.f32 fa, fa, $10;",
                      "mul.f32 fb, fb, $10;", "cvt.rn.bf16x2.f32 t, fb, fa;"]
        else:
            lines.append("mul.f16x2 t, t, s2;")
        lines.append(f"mov.b32 {{${j}, ${j + 4}}}, t;")
    return "\n" + "\n".join(lines + ["}"]) + "\n"


_WORD_DEQUANT_F16 = tl.constexpr(_word_dequant_ptx(bf16=False))
_WORD_DEQUANT_BF16 = tl.constexpr(_word_dequant_ptx(bf16=True))


@triton.jit
def word_lanes(words, zf, s, DTYPE: tl.constexpr, USE_ASM: tl.constexpr):
    """The eight dequantized lanes of each packed word (lane j: channel lane_channel(r, j)), exactly as
    the reference rounds them; zf is 1024 + zero. PTX on a GPU, plain Triton under the interpreter."""
    if USE_ASM and tl.float16 == DTYPE:  # ~2 instructions per weight
        return tl.inline_asm_elementwise(
            _WORD_DEQUANT_F16, "=h,=h,=h,=h,=h,=h,=h,=h,r,h,h",
            [words, tl.broadcast_to(zf, words.shape), tl.broadcast_to(s, words.shape)],
            dtype=(tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16, tl.float16,
                   tl.float16), is_pure=True, pack=1)
    elif USE_ASM:  # bf16
        return tl.inline_asm_elementwise(
            _WORD_DEQUANT_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r,h,f",
            [words, tl.broadcast_to(zf, words.shape), tl.broadcast_to(s.to(tl.float32), words.shape)],
            dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16,
                   tl.bfloat16), is_pure=True, pack=1)
    else:
        return (dequant_lane(words, 0, zf, s, DTYPE), dequant_lane(words, 1, zf, s, DTYPE),
                dequant_lane(words, 2, zf, s, DTYPE), dequant_lane(words, 3, zf, s, DTYPE),
                dequant_lane(words, 4, zf, s, DTYPE), dequant_lane(words, 5, zf, s, DTYPE),
                dequant_lane(words, 6, zf, s, DTYPE), dequant_lane(words, 7, zf, s, DTYPE))


@triton.jit
def scale_zero(s_ptr, z_ptr, k0, offs_w, mask_w, offs_n, mask_n, N, GROUP_SIZE: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """Scales and 1024 + zeros of a block's channels: one row when the block sits inside a group, else one
    row per word row (an interleaved word spans one 32-channel chunk, and groups are multiples of 32)."""
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


@triton.jit(do_not_specialize=["MN"])  # M * N: see PER_STEP
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
                    GROUP_SIZE: tl.constexpr, HAS_PERM: tl.constexpr, INTERLEAVED: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W [K, N] in the checkpoint's channel order (packed row k goes to row perm[k])."""
    offs_w = tl.program_id(0) * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_w, mask_n = offs_w < K // 8, offs_n < N
    words = tl.load(qw_ptr + offs_w[:, None] * N + offs_n[None, :], mask=mask_w[:, None] & mask_n[None, :], other=0)
    k0 = tl.program_id(0) * BLOCK_K
    s, zf = scale_zero(s_ptr, z_ptr, k0, offs_w, mask_w, offs_n, mask_n, N, GROUP_SIZE, BLOCK_K)
    for j in tl.static_range(8):
        w = dequant_lane(words, j, zf, s, w_ptr.dtype.element_ty)
        dest = lane_channel(offs_w, j) if INTERLEAVED else offs_w * 8 + j
        if HAS_PERM:
            dest = tl.load(perm_ptr + dest, mask=mask_w, other=0)
        tl.store(w_ptr + dest.to(tl.int64)[:, None] * N + offs_n[None, :], w, mask=mask_w[:, None] & mask_n[None, :])


def runs_on_gpu(x: torch.Tensor) -> bool:
    """The kernels compile for x's GPU (PTX allowed) rather than run under Triton's interpreter."""
    return x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"


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


def fits_groups(block_k: int, group_size: int) -> bool:
    """A block of block_k channels (a multiple of 16) lies inside one group or spans whole groups."""
    return block_k % 16 == 0 and (group_size % block_k == 0 if block_k <= group_size else block_k % group_size == 0)


def block_k_for(group_size: int, want: int, least: int = 32) -> int | None:
    """The largest power-of-two block_k in [least, want] that fits the groups (None: none does). The
    kernels take whole 32-channel chunks of the interleaved packing; the dequantize kernel takes 16."""
    bk = 1 << (want.bit_length() - 1)  # want itself may be a group size such as 96
    while bk >= least and not fits_groups(bk, group_size):
        bk //= 2
    return bk if bk >= least else None


def check_blocks(cfg: Config, w: PackedW4) -> None:
    if cfg.kind != "dense" and not w.interleaved:
        raise ValueError(f"the {cfg.kind} kernel reads only the interleaved packing (K and the group size multiples "
                         f"of 32), got K={w.in_features}, group size {w.group_size}: only the dense path reads it")
    if cfg.kind != "dense" and cfg.block_k % 32:
        raise ValueError(f"the {cfg.kind} kernel takes whole 32-channel chunks: block_k must be a multiple of 32, "
                         f"got {cfg.block_k}")
    if not fits_groups(cfg.block_k, w.group_size):
        raise ValueError(f"block_k {cfg.block_k} must be a multiple of 16 and sit inside one group or span whole "
                         f"groups of {w.group_size}")


def k_per_split(k: int, cfg: Config) -> int:
    """Channels of K per split: whole BLOCK_K steps (a split past K does nothing but still writes its zeros)."""
    return triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k


def launch(kernel, grid, x, w: PackedW4, bias, cfg: Config, **blocks) -> torch.Tensor:
    m, n, k = x.shape[0], w.out_features, w.in_features
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    split = cfg.split_k > 1
    ws = torch.empty(cfg.split_k, m, n, dtype=torch.float32, device=x.device) if split else out
    perm = w.perm if w.perm is not None else w.qweight
    start(kernel, grid(m, n), x, w.qweight, w.scales, w.zeros, perm, bias if bias is not None else out, out, ws,
          m, n, k, x.stride(0), k_per_split(k, cfg), GROUP_SIZE=w.group_size, HAS_PERM=w.perm is not None,
          HAS_BIAS=bias is not None, SPLIT=split, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
          num_warps=cfg.num_warps, num_stages=cfg.num_stages, **blocks)
    if split:
        block = 1024
        start(_splitk_reduce_kernel, (triton.cdiv(m * n, block),), ws, bias if bias is not None else out, out, m * n,
              n, SPLIT_K=cfg.split_k, HAS_BIAS=bias is not None, BLOCK=block, num_warps=4)
    return out




@triton.jit
def store_tile(acc, rows, cols, bias_ptr, out_ptr, ws_ptr, pid_k, M, N, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr):
    """A tensor-core program's sums, acc[i, j] for out[rows[i, j], cols[i, j]] (rows and cols broadcast to
    acc's shape, in either orientation): with SPLIT, this split's partial sums into `launch`'s workspace
    [split, M, N]; else the output, plus the bias."""
    mask = (rows < M) & (cols < N)
    if SPLIT:
        tl.store(ws_ptr + (pid_k * M + rows).to(tl.int64) * N + cols, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows.to(tl.int64) * N + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize(w: PackedW4, dtype: torch.dtype, block_n: int = 128, block_k: int | None = None) -> torch.Tensor:
    """W: [K, N] of dtype, in the checkpoint's channel order (the large-M path's first half)."""
    k, n = w.in_features, w.out_features
    block_k = block_k or block_k_for(w.group_size, 128, least=16)
    if block_k is None:  # groups no power-of-two block fits (24 channels, say): the torch twin
        return dequantize_ref(w).T.to(dtype)
    check_blocks(Config("dense", block_n=block_n, block_k=block_k), w)
    out = torch.empty(k, n, dtype=dtype, device=w.qweight.device)
    perm = w.perm if w.perm is not None else w.qweight
    start(_dequant_kernel, (triton.cdiv(k, block_k), triton.cdiv(n, block_n)), w.qweight, w.scales, w.zeros, perm,
          out, n, k, GROUP_SIZE=w.group_size, HAS_PERM=w.perm is not None, INTERLEAVED=w.interleaved,
          BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out


def dequant_mm(x: torch.Tensor, w: PackedW4, bias: torch.Tensor | None = None, cfg: Config | None = None) -> torch.Tensor:
    """Dequantize to x's dtype, then cuBLAS: where M is large enough, the GEMM hides the extra pass."""
    check_args(x, w, bias)
    dense = dequantize(w, x.dtype)  # [K, N]
    return torch.addmm(bias, x, dense) if bias is not None else torch.mm(x, dense)
