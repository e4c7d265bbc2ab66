"""Fused elementwise kernels: residual add + RMSNorm, rotary embedding in place, SiLU(gate) * up.

In eager torch each of these is 5 to 15 small kernels; a decode step of a 32-layer model would spend
more time launching them than the GEMMs take to stream the weights. Each has a torch twin (`*_ref`)
that computes the same function the way transformers does, and is the CPU path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def _check_rows(name: str, x: torch.Tensor) -> None:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"{name} must be 2-D with a contiguous last dim, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}")


# -- residual add + RMSNorm ----------------------------------------------------------------------


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, x_stride, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        # the sum is rounded to the activation dtype first, as `residual + hidden` is in torch
        x = x + tl.load(res_ptr + row * n_cols + cols, mask=ok, other=0.0)
        tl.store(res_out_ptr + row * n_cols + cols, x, mask=ok)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0)
    tl.store(out_ptr + row * n_cols + cols, w * (xf * rstd).to(x.dtype), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm(x + residual); with a residual, also returns the sum (the next residual)."""
    _check_rows("x", x)
    if weight.shape != (x.shape[1],) or weight.dtype != x.dtype:
        raise ValueError(f"weight must be [{x.shape[1]}] of {x.dtype}, got {tuple(weight.shape)} {weight.dtype}")
    if residual is not None and (residual.shape != x.shape or not residual.is_contiguous()):
        raise ValueError(f"residual must be contiguous with x's shape {tuple(x.shape)}")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else out
    if x.shape[0]:
        _add_rms_norm_kernel[(x.shape[0],)](
            x, residual if residual is not None else x, weight, out, res_out, x.shape[1], x.stride(0), eps,
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(x.shape[1]), num_warps=8)
    return (out, res_out) if residual is not None else out


def rms_norm_ref(x, weight, eps, residual=None):
    if residual is not None:
        x = residual + x
    dtype = x.dtype
    xf = x.float()
    out = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    return (out, x) if residual is not None else out


# -- rotary embedding ----------------------------------------------------------------------------


@triton.jit
def _rotary_kernel(x_ptr, pos_ptr, cos_ptr, sin_ptr, row_stride, num_heads,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, HALF)
    ok = (heads < num_heads)[:, None]
    # cos, sin rows hold the same frequencies twice (HF's layout): the first half is enough
    cos = tl.load(cos_ptr + pos * 2 * HALF + dims)[None, :]
    sin = tl.load(sin_ptr + pos * 2 * HALF + dims)[None, :]
    base = x_ptr + token * row_stride + heads[:, None] * 2 * HALF + dims[None, :]
    x1 = tl.load(base, mask=ok, other=0.0)
    x2 = tl.load(base + HALF, mask=ok, other=0.0)
    cos, sin = cos.to(x1.dtype), sin.to(x1.dtype)
    tl.store(base, x1 * cos - x2 * sin, mask=ok)
    tl.store(base + HALF, x2 * cos + x1 * sin, mask=ok)


def rotary_(positions: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x: [num_tokens, num_heads, head_dim] (a strided view is fine) in place."""
    if x.dim() != 3 or x.stride(2) != 1 or x.stride(1) != x.shape[2]:
        raise ValueError(f"x must be [tokens, heads, head_dim] with packed heads, got strides {x.stride()}")
    head_dim = x.shape[2]
    if head_dim % 2 or head_dim & (head_dim - 1) or cos.shape[1] != head_dim:
        raise ValueError(f"head_dim must be an even power of two matching the tables, got {head_dim}")
    if positions.shape != (x.shape[0],):
        raise ValueError(f"positions must be [{x.shape[0]}], got {tuple(positions.shape)}")
    if x.shape[0]:
        _rotary_kernel[(x.shape[0],)](x, positions, cos, sin, x.stride(0), x.shape[1], HALF=head_dim // 2,
                                      BLOCK_H=triton.next_power_of_2(x.shape[1]), num_warps=4)
    return x


def rotary_ref(positions, x, cos, sin):
    c = cos[positions].to(x.dtype).unsqueeze(1)
    s = sin[positions].to(x.dtype).unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * c + torch.cat((-x2, x1), dim=-1) * s


# -- SiLU(gate) * up -----------------------------------------------------------------------------


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    gate = tl.load(x_ptr + row * 2 * n_cols + cols, mask=ok, other=0.0)
    up = tl.load(x_ptr + row * 2 * n_cols + n_cols + cols, mask=ok, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(out_ptr + row * n_cols + cols, silu * up, mask=ok)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, 2 * inter] (gate, up) -> [num_tokens, inter]."""
    if x.dim() != 2 or not x.is_contiguous() or x.shape[1] % 2:
        raise ValueError(f"x must be contiguous [tokens, 2 * inter], got shape {tuple(x.shape)}")
    n = x.shape[1] // 2
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    block = min(4096, triton.next_power_of_2(n))
    if x.shape[0]:
        _silu_mul_kernel[(x.shape[0], triton.cdiv(n, block))](x, out, n, BLOCK=block, num_warps=4)
    return out


def silu_and_mul_ref(x):
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
