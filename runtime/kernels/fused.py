"""Fused elementwise kernels: residual add + RMSNorm, act(gate) * up for SiLU and GELU-tanh (rotary
embedding: kv_store.py). Gemma's RMSNorm scales by (1 + weight), in fp32 before the cast (`plus_one`).

In eager torch each of these is 5 to 15 small kernels; a decode step of a 32-layer model would spend
more time launching them than the GEMMs take to stream the weights. Each has a torch twin (`*_ref`)
that computes the same function the way transformers does, and is the CPU path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llmctl.runtime.kernels.compiling import start


def _check_rows(name: str, x: torch.Tensor) -> None:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"{name} must be 2-D with a contiguous last dim, got shape {tuple(x.shape)} "
                         f"strides {x.stride()}")


# -- residual add + RMSNorm ----------------------------------------------------------------------


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, x_stride, eps,
                         HAS_RESIDUAL: tl.constexpr, PLUS_ONE: tl.constexpr, BLOCK: tl.constexpr):
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
    if PLUS_ONE:  # noqa: SIM108 (a constexpr branch: one side is compiled)
        out = (xf * rstd * (1.0 + w.to(tl.float32))).to(x.dtype)
    else:
        out = w * (xf * rstd).to(x.dtype)
    tl.store(out_ptr + row * n_cols + cols, out, mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             plus_one: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm(x + residual); with a residual, also returns the sum (the next residual)."""
    _check_rows("x", x)
    if weight.shape != (x.shape[1],) or weight.dtype != x.dtype:
        raise ValueError(f"weight must be [{x.shape[1]}] of {x.dtype}, got {tuple(weight.shape)} {weight.dtype}")
    if residual is not None and (residual.shape != x.shape or not residual.is_contiguous()):
        raise ValueError(f"residual must be contiguous with x's shape {tuple(x.shape)}")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else out
    if x.shape[0]:
        start(
            _add_rms_norm_kernel, (x.shape[0],),
            x, residual if residual is not None else x, weight, out, res_out, x.shape[1], x.stride(0), eps,
            HAS_RESIDUAL=residual is not None, PLUS_ONE=plus_one, BLOCK=triton.next_power_of_2(x.shape[1]),
            num_warps=8)
    return (out, res_out) if residual is not None else out


def rms_norm_ref(x, weight, eps, residual=None, plus_one=False):
    if residual is not None:
        x = residual + x
    dtype = x.dtype
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = (normed * (1.0 + weight.float())).to(dtype) if plus_one else weight * normed.to(dtype)
    return (out, x) if residual is not None else out


# -- SiLU(gate) * up -----------------------------------------------------------------------------


@triton.jit
def _act_mul_kernel(x_ptr, out_ptr, n_cols, GELU: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_cols
    gate = tl.load(x_ptr + row * 2 * n_cols + cols, mask=ok, other=0.0)
    up = tl.load(x_ptr + row * 2 * n_cols + n_cols + cols, mask=ok, other=0.0)
    g = gate.to(tl.float32)
    if GELU:  # GELU, tanh form: 0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3))), tanh as 1 - 2 / (e^2y + 1)
        y = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        act = (0.5 * g * (2.0 - 2.0 / (tl.exp(2.0 * y) + 1.0))).to(gate.dtype)
    else:
        act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(out_ptr + row * n_cols + cols, act * up, mask=ok)


def _act_and_mul(x: torch.Tensor, gelu: bool) -> torch.Tensor:
    if x.dim() != 2 or not x.is_contiguous() or x.shape[1] % 2:
        raise ValueError(f"x must be contiguous [tokens, 2 * inter], got shape {tuple(x.shape)}")
    n = x.shape[1] // 2
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    block = min(4096, triton.next_power_of_2(n))
    if x.shape[0]:
        start(_act_mul_kernel, (x.shape[0], triton.cdiv(n, block)), x, out, n, GELU=gelu, BLOCK=block, num_warps=4)
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, 2 * inter] (gate, up) -> SiLU(gate) * up: [num_tokens, inter]."""
    return _act_and_mul(x, gelu=False)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [num_tokens, 2 * inter] (gate, up) -> GELU-tanh(gate) * up (Gemma's MLP)."""
    return _act_and_mul(x, gelu=True)


def silu_and_mul_ref(x):
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul_ref(x):
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up
