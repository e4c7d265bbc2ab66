"""The integer grid every method ends on, and RTN: fit the grid per group of input channels, round.

A linear's weight W: [out, in] is cut along `in` into groups of `group_size` channels; each output row
of each group gets a scale and an integer zero, and w ≈ scale * (q - zero) with q in [0, 2^bits - 1].
Symmetric grids fix zero at 2^(bits-1) (GPTQ's convention), asymmetric ones fit it from min and max.
QuantizedWeight, the layout-neutral result, lives with the checkpoint formats that pack it.
Scales are rounded to the checkpoint's scale dtype when they are fitted (fp16 for GPTQ and AWQ, the
model's for compressed-tensors): the weights a method optimizes against are then exactly the ones a
loader will reconstruct.
"""

from __future__ import annotations

import torch

from llmctl.checkpoint.formats.weights import QuantizedWeight


def check_grid(bits: int, group_size: int, in_features: int) -> None:
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8, got {bits}")
    if group_size != -1 and (group_size < 1 or in_features % group_size):
        raise ValueError(f"group size {group_size} does not divide the {in_features} input channels of a linear")


def fit(w: torch.Tensor, bits: int, sym: bool, min_zero: int = 0, scale_dtype: torch.dtype = torch.float16
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero per row of w: [rows, cols] -> ([rows, 1] float, [rows, 1] float holding integers).

    GPTQ's quantizer: the range always contains 0, so that exact zeros stay exact. GPTQ v1 stores
    zero - 1, so it passes min_zero=1: a stored -1 would borrow from the neighbouring packed zero.
    """
    maxq = 2**bits - 1
    xmin = w.min(dim=1, keepdim=True).values.clamp(max=0)
    xmax = w.max(dim=1, keepdim=True).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)  # an all-zero row still needs a usable scale
    xmin, xmax = xmin.masked_fill(flat, -1.0), xmax.masked_fill(flat, 1.0)
    scale = ((xmax - xmin) / maxq).to(scale_dtype).float().clamp(min=torch.finfo(scale_dtype).tiny)
    zero = torch.full_like(scale, (maxq + 1) // 2) if sym else torch.round(-xmin / scale).clamp(min_zero, maxq)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of w for the grid (broadcast along rows): same shape as w, float holding integers."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return scale * (quantize(w, scale, zero, bits) - zero)


def fake_quantize_groups(w: torch.Tensor, bits: int, group_size: int, sym: bool,
                         scale_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """RTN of w: [out, in] in groups, returned dense (AWQ's searches score candidates with this)."""
    rows, cols = w.shape
    size = cols if group_size == -1 else group_size
    grouped = w.reshape(-1, size)  # [out * groups, size]
    scale, zero = fit(grouped, bits, sym, scale_dtype=scale_dtype)
    return fake_quantize(grouped, scale, zero, bits).reshape(rows, cols)


def rtn(w: torch.Tensor, bits: int, group_size: int, sym: bool, min_zero: int = 0,
        scale_dtype: torch.dtype = torch.float16) -> QuantizedWeight:
    """Round-to-nearest, the baseline: w: [out, in] -> QuantizedWeight with groups in channel order."""
    rows, cols = w.shape
    check_grid(bits, group_size, cols)
    size = cols if group_size == -1 else group_size
    grouped = w.float().reshape(rows, cols // size, size)  # [out, groups, size]
    scale, zero = fit(grouped.reshape(-1, size), bits, sym, min_zero, scale_dtype)  # [out * groups, 1]
    q = quantize(grouped.reshape(-1, size), scale, zero, bits).reshape(rows, cols)
    g_idx = torch.arange(cols, device=w.device) // size
    return QuantizedWeight(q.int(), scale.view(rows, -1), zero.view(rows, -1).int(), g_idx.int(), bits, size)
