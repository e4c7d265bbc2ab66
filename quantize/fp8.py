"""FP8 weights: float8_e4m3fn with one scale per output channel, llm-compressor's FP8_DYNAMIC weight scheme.

No calibration: a row's scale is its largest magnitude over FP8's largest value (448), and each weight is
divided by it and cast to the nearest FP8 value; activations are left to the server, which quantizes
them per token as they come (the scheme's dynamic input activations).

The arithmetic is compressed-tensors' own (its min-max observer, `calculate_qparams`, the eager
`quantize`), in the checkpoint's scale dtype, so that the checkpoint equals llm-compressor's bit for bit:
the scale is the absmax divided by 448 in that dtype, an all-zero row gets that dtype's eps instead of 0,
and w / scale is rounded to the scale dtype before the cast to FP8 (two roundings; dividing in fp32 would
land one FP8 step away for a few percent of the weights). That is its eager path, which it takes for
weights on a CPU or a GPU older than Hopper; for weights on a Hopper GPU it divides in fp32 in a Triton
kernel instead, so its own checkpoints differ by device, and llmctl's equal the eager ones on every device.
"""

from __future__ import annotations

import torch

from llmctl.checkpoint.formats.weights import Fp8Weight

FLOAT8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FLOAT8).max  # 448


def fp8_channel(w: torch.Tensor, dtype: torch.dtype) -> Fp8Weight:
    """w: [out, in] -> FP8 codes and [out, 1] scales; dtype: the checkpoint's scale dtype (the model's)."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"FP8 scales are stored in the model's float dtype, got {dtype}")
    w = w.to(dtype)
    # 0-dim tensors, not Python floats: CUDA divides by a host scalar as a multiplication by its reciprocal.
    fp8_max = torch.tensor(FP8_MAX, dtype=dtype, device=w.device)
    scale = w.abs().amax(dim=1, keepdim=True) / fp8_max  # [out, 1]
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(dtype).eps, dtype=dtype, device=w.device), scale)
    # Its quantize adds the symmetric zero point, 0, which also turns a -0.0 weight into a +0.0 code.
    zero = torch.zeros((), dtype=dtype, device=w.device)
    codes = (w / scale + zero).clamp(-FP8_MAX, FP8_MAX).to(FLOAT8)  # [out, in]
    return Fp8Weight(codes, scale.float(), rounding=dtype)
