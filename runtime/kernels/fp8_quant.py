"""Per-token FP8 quantization of activations in one launch: x [M, K] -> (e4m3 [M, K], scale [M, 1] fp32).

The FP8 GEMM (`torch._scaled_mm`, row-wise) takes x quantized with one scale per row: scale = max(row absmax /
448, 1e-12) and codes = round(x / scale) clamped to +-448. In torch that is five kernels (abs, amax, divide,
clamp, cast) and two passes over x in fp32; here one program per row reads its row twice (the second time
from cache) and writes the codes and the scale.

The result is bit for bit `fp8_linear.quantize_rows(x, None)`, torch's own rounding: the scale is the row's
absmax times fp32(1 / 448) (what torch computes for a division by a Python number on CUDA, and what
`quantize_rows` asks for on every device), x / scale is an IEEE division (`div_rn`: Triton's default `/` is
approximate on NVIDIA GPUs), and the rounding to e4m3 is done in arithmetic onto its grid (kv_store's
`_round_e4m3`), since the interpreter's cast mishandles the values that round up to the next power of two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmctl.runtime.kernels.compiling import start
from llmctl.runtime.kernels.kv_store import FP8, FP8_MAX, _round_e4m3

MIN_SCALE = 1e-12  # a row of zeros still gets a usable scale
MAX_BLOCK = 4096  # channels a program reads a step: wider rows are read in steps
_INV_FP8_MAX: tl.constexpr = tl.constexpr(1.0 / FP8_MAX)
_MIN_SCALE: tl.constexpr = tl.constexpr(MIN_SCALE)


@triton.jit
def _quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, BLOCK: tl.constexpr, ONE_STEP: tl.constexpr):
    """One row: its absmax (a first pass over K), then its codes (a second); ONE_STEP: K fits one block."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    x_row, q_row = x_ptr + row * stride_xm, q_ptr + row * stride_qm
    if ONE_STEP:
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=0)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            ks = k0 + offs
            amax = tl.maximum(amax, tl.abs(tl.load(x_row + ks, mask=ks < K, other=0.0).to(tl.float32)))
        amax = tl.max(amax, axis=0)
    scale = tl.maximum(amax * _INV_FP8_MAX, _MIN_SCALE)
    tl.store(s_ptr + row, scale)
    if ONE_STEP:
        tl.store(q_row + offs, _round_e4m3(tl.math.div_rn(x, scale)).to(q_ptr.dtype.element_ty), mask=offs < K)
    else:
        for k0 in range(0, K, BLOCK):
            ks = k0 + offs
            x = tl.load(x_row + ks, mask=ks < K, other=0.0).to(tl.float32)
            tl.store(q_row + ks, _round_e4m3(tl.math.div_rn(x, scale)).to(q_ptr.dtype.element_ty), mask=ks < K)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] fp16/bf16/fp32, rows contiguous -> (FP8 [M, K], scale [M, 1] fp32)."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be 2-D [M, K] with contiguous rows, got shape {tuple(x.shape)} strides {x.stride()}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    m, k = x.shape
    q = torch.empty(m, k, dtype=FP8, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m == 0 or k == 0:
        return q, scale.fill_(MIN_SCALE)
    block = min(MAX_BLOCK, triton.next_power_of_2(k))
    start(_quant_kernel, (m,), x, q, scale, k, x.stride(0), q.stride(0), BLOCK=block, ONE_STEP=block >= k,
          num_warps=4 if block <= 2048 else 8)
    return q, scale
