"""Weight-only FP8 GEMV for small M (decode): y = x @ (W * scale).T with W [N, K] e4m3 and scale [N, 1] fp32.

At a few rows a linear is bound by reading its weight, so the activations need not be quantized: each FP8
weight is widened in registers (exactly: every e4m3 value is an fp16 and a bf16) and multiplied with x as
it is, summed in fp32, and the channel's scale applied once to the sum. That reads the weight's bytes once
and skips the per-token quantization the FP8 GEMM needs (vLLM's FP8 Marlin does the same); it is at least
as accurate as quantizing x. Each program streams a [BLOCK_N, BLOCK_K] tile of W's rows, K contiguous, so
each thread loads 16 bytes at a time.

- One row of x (M = 1): on the FMA units, an fp32 [BLOCK_N, BLOCK_K] accumulator summed over K at the end.
  `GemvConfig.packed` reads the weight as 32-bit words of four instead, widened in PTX, which lets a
  step's loads be issued a step ahead (num_stages >= 2); which wins is for `bench.fp8_kernels --sweep`.
- More rows: out.T = W @ x.T on tensor cores, the weight tile as the MMA's first operand so that BLOCK_M
  rows of x may be as few as 16 (Hopper's wgmma takes N = 16) at no cost in weight traffic.

Split-K spreads a layer's K over more programs so that a 4096-wide one still fills every SM: each split
stores its fp32 partial sums and the last split of a tile to arrive (counted with an acq_rel atomic) adds
them up in split order, so the sum is deterministic and no second kernel is launched (a launch costs
about as much as a small layer's whole GEMV): `splitk`, shared with `dense_gemv`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmctl.runtime.kernels.compiling import start
from llmctl.runtime.kernels.e4m3 import e4m3
from llmctl.runtime.kernels.splitk import MAX_SPLIT, GemvConfig, finish, plan
from llmctl.runtime.kernels.w4a16.common import PER_STEP, runs_on_gpu

FP8 = torch.float8_e4m3fn
X_DTYPES = (torch.float16, torch.bfloat16)


def block_m_for(m: int) -> int:
    """Rows of x a program holds: 1 (the FMA path), else 16 to 64 (tensor cores; larger M is tiled)."""
    return 1 if m == 1 else min(64, max(16, triton.next_power_of_2(m)))


def default_config(m: int, n: int, k: int, device: torch.device) -> GemvConfig:
    """A configuration from the shape alone: the smallest split of K that gives about four programs (FMA) or
    two (tensor cores) per SM, each with at least two steps of K. To be confirmed by `bench.fp8_kernels`."""
    cfg = GemvConfig(16, 512, num_warps=4, num_stages=1) if m == 1 else GemvConfig(64, 256, num_warps=4)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    target = (4 if m == 1 else 2) * sms
    tiles = triton.cdiv(n, cfg.block_n) * triton.cdiv(m, block_m_for(m))
    split = 1
    while split < MAX_SPLIT and tiles * split < target and k >= 4 * split * cfg.block_k:
        split *= 2
    return GemvConfig(cfg.block_n, cfg.block_k, split, cfg.num_warps, cfg.num_stages)


@triton.jit(do_not_specialize=PER_STEP)
def _gemv_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr, M, N, K, stride_xm, k_per_split,
                 HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, EVEN: tl.constexpr, DOT_FP32: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out.T[n, m] = scale[n] * sum_k W[n, k] x[m, k] over this program's split of K. EVEN: N and K are
    whole blocks (and so is each split), so the loop loads the weight unmasked. DOT_FP32: bf16 under
    Triton's interpreter, whose bf16 dot is wrong, multiplies in fp32 (exact products either way)."""
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_x = tl.where(offs_m < M, offs_m, 0).to(tl.int64)  # rows past M read row 0: no row mask on x
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * K
    offs_k = tl.arange(0, BLOCK_K)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    if BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + offs_k
        if EVEN:
            w = tl.load(w_rows + ks[None, :])  # [BLOCK_N, BLOCK_K] fp8
        else:
            w = tl.load(w_rows + ks[None, :], mask=mask_n[:, None] & (ks < K)[None, :], other=0.0)
        if BLOCK_M == 1:
            x = tl.load(x_ptr + rows_x * stride_xm + ks, mask=ks < K, other=0.0)  # [BLOCK_K]
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        else:
            xt = tl.load(x_ptr + rows_x[None, :] * stride_xm + ks[:, None], mask=(ks < K)[:, None],
                         other=0.0)  # [BLOCK_K, BLOCK_M]
            if DOT_FP32:
                acc += tl.dot(w.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
            else:
                acc = tl.dot(w.to(xt.dtype), xt, acc)
    if BLOCK_M == 1:
        acc = tl.sum(acc, axis=1)[:, None]
    acc = acc * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
    finish(acc, offs_m, offs_n, ws_ptr, lock_ptr, bias_ptr, out_ptr, M, N, pid_m, pid_n, pid_k, HAS_BIAS, SPLIT)


# Four e4m3 weights (one 32-bit word, little-endian: weight k in byte k % 4) against their four x values, added
# to $6: two cvt.rn.f16x2.e4m3x2 widen the bytes exactly (sm_89+), then fp32 conversions and FMAs.
_WORD_DOT = tl.constexpr("""
{
.reg .b16 lo, hi, a, b, c, d;
.reg .b32 h0, h1;
.reg .f32 fa, fb, fc, fd;
mov.b32 {lo, hi}, $1;
cvt.rn.f16x2.e4m3x2 h0, lo;
cvt.rn.f16x2.e4m3x2 h1, hi;
mov.b32 {a, b}, h0;
mov.b32 {c, d}, h1;
cvt.f32.f16 fa, a;
cvt.f32.f16 fb, b;
cvt.f32.f16 fc, c;
cvt.f32.f16 fd, d;
fma.rn.f32 $0, fa, $2, $6;
fma.rn.f32 $0, fb, $3, $0;
fma.rn.f32 $0, fc, $4, $0;
fma.rn.f32 $0, fd, $5, $0;
}
""")


@triton.jit
def _word_dot(words, x0, x1, x2, x3, acc, USE_ASM: tl.constexpr):
    if USE_ASM:
        return tl.inline_asm_elementwise(_WORD_DOT, "=f,r,f,f,f,f,f", [words, x0, x1, x2, x3, acc],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return acc + e4m3(words) * x0 + e4m3(words >> 8) * x1 + e4m3(words >> 16) * x2 + e4m3(words >> 24) * x3


@triton.jit
def _word_step(w_rows, x_row, k0, k_end, k_last, offs_w, mask_n, K, EVEN: tl.constexpr):
    """One step's words [BLOCK_N, BLOCK_K / 4] and x lanes 4j .. 4j + 3 (fp32). A step at or past k_end (the
    prefetch after a split's last step) reloads k_last's, from cache: a step always loads unmasked if EVEN."""
    k = tl.where(k0 < k_end, k0, k_last)
    ws = k // 4 + offs_w
    if EVEN:
        words = tl.load(w_rows + ws[None, :])
    else:
        words = tl.load(w_rows + ws[None, :], mask=mask_n[:, None] & (ws < K // 4)[None, :], other=0)
    ks = k + 4 * offs_w
    ok = ks < K
    return (words, tl.load(x_row + ks, mask=ok, other=0.0).to(tl.float32),
            tl.load(x_row + ks + 1, mask=ok, other=0.0).to(tl.float32),
            tl.load(x_row + ks + 2, mask=ok, other=0.0).to(tl.float32),
            tl.load(x_row + ks + 3, mask=ok, other=0.0).to(tl.float32))


@triton.jit(do_not_specialize=PER_STEP)
def _words_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, ws_ptr, lock_ptr, M, N, K, stride_xm, k_per_split,
                  HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, EVEN: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr, USE_ASM: tl.constexpr):
    """One row of x (M = 1): W read as int32 words of four weights, widened in PTX (four weights to ten
    instructions). PREFETCH (num_stages >= 2): each step's words and x are loaded a step ahead, in registers;
    Triton pipelines only loads that feed a tl.dot, so otherwise every step waits out its own loads. (The
    byte-typed tile of `_gemv_kernel` cannot be carried so: Triton keeps an fp8 loop variable a byte a
    register and repacks it with PRMTs, ~130 instructions a step: scripts/sass_report.py.)"""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    w_rows = w_ptr.to(tl.pointer_type(tl.int32)) + offs_n.to(tl.int64)[:, None] * (K // 4)
    offs_w = tl.arange(0, BLOCK_K // 4)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros([BLOCK_N, BLOCK_K // 4], dtype=tl.float32)
    if PREFETCH:
        w_n, x0_n, x1_n, x2_n, x3_n = _word_step(w_rows, x_ptr, k_start, k_end, k_start, offs_w, mask_n, K, EVEN)
    for k0 in range(k_start, k_end, BLOCK_K):
        if PREFETCH:  # this step's words were loaded a step ago; load the next step's now
            words, x0, x1, x2, x3 = w_n, x0_n, x1_n, x2_n, x3_n
            w_n, x0_n, x1_n, x2_n, x3_n = _word_step(w_rows, x_ptr, k0 + BLOCK_K, k_end, k0, offs_w, mask_n, K, EVEN)
        else:
            words, x0, x1, x2, x3 = _word_step(w_rows, x_ptr, k0, k_end, k0, offs_w, mask_n, K, EVEN)
        acc = _word_dot(words, x0[None, :], x1[None, :], x2[None, :], x3[None, :], acc, USE_ASM)
    acc = tl.sum(acc, axis=1)[:, None] * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
    finish(acc, tl.zeros([1], dtype=tl.int32), offs_n, ws_ptr, lock_ptr, bias_ptr, out_ptr, M, N, 0, pid_n, pid_k,
            HAS_BIAS, SPLIT)


def check_args(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Shapes, dtypes, devices and strides, checked before any launch."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be 2-D [M, K] with contiguous rows, got shape {tuple(x.shape)} strides {x.stride()}")
    if x.dtype not in X_DTYPES:
        raise ValueError(f"x must be float16 or bfloat16, got {x.dtype}")
    if weight.dtype != FP8 or weight.dim() != 2 or not weight.is_contiguous():
        raise ValueError(f"the weight must be a contiguous [N, K] {FP8}, got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} input features, the weight {k}")
    if scale.dtype != torch.float32 or scale.numel() != n or not scale.is_contiguous():
        raise ValueError(f"the scale must be contiguous fp32 with one value per output channel ({n}), got "
                         f"{scale.dtype} {tuple(scale.shape)}")
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(f"bias must be contiguous [{n}], got {tuple(bias.shape)}")
    if any(t.device != x.device for t in (weight, scale, *(() if bias is None else (bias,)))):
        raise ValueError(f"x is on {x.device} but the weight, scale or bias is not")


def gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
         cfg: GemvConfig | None = None) -> torch.Tensor:
    """x: [M, K] fp16/bf16, weight [N, K] FP8, scale [N, 1] fp32 -> [M, N] in x's dtype."""
    check_args(x, weight, scale, bias)
    (m, k), n = x.shape, weight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    cfg = cfg or default_config(m, n, k, x.device)
    block_m = block_m_for(m)
    tiles_n, tiles_m = triton.cdiv(n, cfg.block_n), triton.cdiv(m, block_m)
    split, per_split, ws, locks = plan(x, out, k, cfg, tiles_n * tiles_m)
    even = n % cfg.block_n == 0 and k % cfg.block_k == 0
    if cfg.packed and m == 1 and k % 16 == 0 and cfg.block_k % 16 == 0:  # whole, aligned words
        start(_words_kernel, (tiles_n, split, 1), x, weight, scale, bias if bias is not None else out, out, ws,
              locks, m, n, k, x.stride(0), per_split, HAS_BIAS=bias is not None, SPLIT=split, EVEN=even,
              BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PREFETCH=cfg.num_stages >= 2, USE_ASM=runs_on_gpu(x),
              num_warps=cfg.num_warps, num_stages=1)
        return out
    start(_gemv_kernel, (tiles_n, split, tiles_m), x, weight, scale, bias if bias is not None else out, out, ws, locks,
          m, n, k, x.stride(0), per_split, HAS_BIAS=bias is not None, SPLIT=split, EVEN=even,
          DOT_FP32=x.dtype == torch.bfloat16 and not runs_on_gpu(x), BLOCK_M=block_m, BLOCK_N=cfg.block_n,
          BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
             bias: torch.Tensor | None = None) -> torch.Tensor:
    """The torch twin: the dequantized weight and x multiplied in fp32, rounded once to x's dtype."""
    out = x.float() @ (weight.float() * scale.float().reshape(-1, 1)).T
    return (out if bias is None else out + bias.float()).to(x.dtype)
