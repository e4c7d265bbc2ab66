"""A linear layer over FP8 (e4m3) weights, run as FP8 GEMMs with dynamic activation scales, or, for a few
tokens, as a weight-only GEMV.

The weight stays in FP8 with its scales, per output channel (a per-tensor scale is expanded to one per
channel, exactly) or per 128 x 128 block. Each GEMM call quantizes the activations to FP8 on the fly: one
scale per token for channel-scaled weights (`torch._scaled_mm`, row-wise scaling; on a GPU the quantization
is one Triton kernel, `fp8_quant`), one per token and 128-channel group for block-scaled ones
(`F.scaled_mm`, DeepSeek's 1x128 / 128x128 recipe). A checkpoint's static `input_scale` is used as every
token's scale. `linear_ref` is the torch twin: the same quantized operands, dequantized and multiplied in fp32.

Decode is bound by reading the weight, and there quantizing the activations (several small kernels a
projection) costs more than the GEMM saves: up to GEMV_MAX_ROWS tokens, channel-scaled weights on a GPU
run `fp8_gemv` instead, which widens each FP8 weight in registers and multiplies it with x unquantized
(its twin is `fp8_gemv.gemv_ref`; it ignores a static input scale, which only bounds the quantization it
skips). `choose_path` says which of the four paths a call takes.

Like Int4Linear, the model builds one per projection with the output sizes of the checkpoint modules it
fuses (q | k | v, gate | up); `load` takes them one by one and concatenates them along N.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from llmctl.checkpoint.formats.weights import Fp8Weight
from llmctl.runtime.kernels import fp8_gemv, fp8_gemv_tune
from llmctl.runtime.kernels.fp8_quant import quantize_per_token

log = logging.getLogger("llmctl.engine")
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max
BLOCK = 128  # the block-wise recipe's group of input channels (and of output channels for the weight)
MIN_SCALE = 1e-12  # a token of zeros still gets a usable scale
M_ALIGN = 16  # rows the block recipe is given at a time (padded with zeros)
# Up to this many tokens the weight-only GEMV runs rather than the FP8 GEMM: measured on an H200 with
# `python -m llmctl.bench.fp8_kernels` (2026-12-05), the GEMV is faster than the fused quantization +
# `_scaled_mm` on all four Llama-2-7B projections up to M = 32, and slower on three of four at 64.
GEMV_MAX_ROWS = 32
PATHS = ("gemv", "fused", "torch", "block")  # see choose_path
# Fp8Linear._path_works's verdicts, per device, weight shape and recipe: what fails is a shape (cuBLAS refuses
# some of the block recipe's) or a kernel, not one layer's values, and checking each of a 7B model's 128 layers
# three times cost seconds of start-up (6.8 s to load its FP8 weights on an H200, against fp16's 3.2).
_works: dict[tuple, bool] = {}


def supported(device: torch.device) -> bool:
    """Where the model runs FP8 checkpoints as FP8 GEMMs: Hopper and later (both the row-wise and the block
    recipe); elsewhere their weights are dequantized at load. (Ada runs row-wise FP8 GEMMs too: not used.)"""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def quantize_rows(x: torch.Tensor, group: int | None, static: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] -> (FP8 [M, K], scale [M, 1] or [M, K / group] fp32): each row's (or row group's) absolute
    maximum maps to FP8's largest value; a static scale is used as it is. The scale is the absmax times
    fp32(1 / 448) on every device (torch divides by a Python number so on CUDA, exactly on CPU), so that
    `fp8_quant`'s kernel can equal it bit for bit anywhere."""
    if static is not None:
        scale = static.float().reshape(1, 1).expand(x.shape[0], 1).contiguous()
    elif group is None:
        scale = (x.abs().amax(-1, keepdim=True).float() * (1 / FP8_MAX)).clamp(min=MIN_SCALE)
    else:
        scale = (x.unflatten(-1, (-1, group)).abs().amax(-1).float() * (1 / FP8_MAX)).clamp(min=MIN_SCALE)
    expanded = scale if scale.shape[1] == 1 else scale.repeat_interleave(group, 1)
    return (x.float() / expanded).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def linear_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: bool,
               input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The torch twin of `fp8_linear`: the same FP8 operands, dequantized, multiplied in fp32."""
    group = BLOCK if block else None
    x_q, x_scale = quantize_rows(x, group, input_scale)
    x_deq = x_q.float() * (x_scale if x_scale.shape[1] == 1 else x_scale.repeat_interleave(BLOCK, 1))
    w_scale = scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[: weight.shape[0], : weight.shape[1]] \
        if block else scale
    out = x_deq @ (weight.float() * w_scale).T
    return (out if bias is None else out + bias.float()).to(x.dtype)


def choose_path(x: torch.Tensor, block: bool, input_scale: torch.Tensor | None,
                gemv_rows: int = GEMV_MAX_ROWS) -> str:
    """Which way `fp8_linear` computes x @ W.T: "block" for block-scaled weights; on CPU "torch" (the
    quantization in torch, then `torch._scaled_mm`, which runs there); on a GPU "gemv" (weight-only) up to
    gemv_rows fp16/bf16 tokens, else "fused" (the quantization kernel, then `torch._scaled_mm`), or "torch"
    where a static input scale leaves nothing to compute."""
    if block:
        return "block"
    if not x.is_cuda:
        return "torch"
    if x.shape[0] <= gemv_rows and x.dtype in fp8_gemv.X_DTYPES and x.stride(-1) == 1:
        return "gemv"
    return "fused" if input_scale is None else "torch"


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block: bool,
               input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               path: str | None = None) -> torch.Tensor:
    """x: [M, K] fp16/bf16/fp32 -> [M, N] in x's dtype; weight [N, K] FP8 with scale [N, 1] (or, block,
    `block_scales` of the [N / 128, K / 128] grid). path: one of PATHS, else `choose_path`'s."""
    path = path or choose_path(x, block, input_scale)
    if path not in PATHS or (path == "block") != block:
        raise ValueError(f"path {path!r} for {'block' if block else 'channel'}-scaled weights: the choices are "
                         f"{'block' if block else ', '.join(PATHS[:3])}")
    if path == "gemv":
        return fp8_gemv.gemv(x, weight, scale, bias, fp8_gemv_tune.chosen(x.shape[0], weight, x.dtype))
    # bf16 out: what cuBLAS's row-wise and block recipes produce on every torch version; cast after.
    out_dtype = torch.bfloat16
    if block:
        m = x.shape[0]
        rows = -(-m // M_ALIGN) * M_ALIGN  # cuBLAS's block recipe takes whole tiles of rows
        x_q, x_scale = quantize_rows(F.pad(x, (0, 0, 0, rows - m)), BLOCK, input_scale)
        if input_scale is not None:
            x_scale = x_scale.expand(-1, x.shape[1] // BLOCK)
        out = F.scaled_mm(x_q, weight.T, _outer_major(x_scale), F.ScalingType.BlockWise1x128,
                          scale, F.ScalingType.BlockWise128x128, output_dtype=out_dtype)[:m]
    else:
        fused = path == "fused" and input_scale is None
        x_q, x_scale = quantize_per_token(x) if fused else quantize_rows(x, None, input_scale)
        out = torch._scaled_mm(x_q, weight.T, scale_a=x_scale, scale_b=scale.reshape(1, -1), out_dtype=out_dtype)
    out = out if bias is None else out + bias
    return out.to(x.dtype)


def block_scales(scale: torch.Tensor) -> torch.Tensor:
    """The weight's [N / 128, K / 128] scale grid as cuBLAS's block recipe reads it: a [K / 128, N / 128] view,
    N-major, its K blocks padded with zeros to a multiple of 4."""
    n_blocks, k_blocks = scale.shape
    buf = torch.zeros(n_blocks, -(-k_blocks // 4) * 4, dtype=torch.float32, device=scale.device)
    buf[:, :k_blocks] = scale
    return buf.t()


def _outer_major(grid: torch.Tensor) -> torch.Tensor:
    """grid [M, K / 128] in the same shape, M-major (what the 1x128 recipe reads)."""
    return grid.t().contiguous().t()


class Fp8Linear(nn.Module):
    """y = x @ W.T (+ bias) for W stored in FP8; out_sizes: the fused modules' output sizes, in order."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_sizes = in_features, list(out_sizes)
        self.out_features = sum(out_sizes)
        self.bias = nn.Parameter(torch.empty(self.out_features)) if bias else None
        self.weight: torch.Tensor | None = None  # [N, K] FP8, once loaded
        self.scale: torch.Tensor | None = None  # [N, 1] fp32, or [N / 128, K / 128] for blocks
        self.block = False
        self.gemm_scale: torch.Tensor | None = None  # scale as the GEMM reads it (block_scales for blocks)
        self.dense: torch.Tensor | None = None  # the dequantized weight, where the device's FP8 GEMM fails
        self.gemv_rows = 0  # tokens up to which the GEMV runs (0: never), once loaded
        self.input_scale: torch.Tensor | None = None
        self._pending: dict[int, Fp8Weight] = {}

    @property
    def loaded(self) -> bool:
        return self.weight is not None

    def load(self, index: int, w: Fp8Weight) -> None:
        """Take checkpoint module `index` (0: q, 1: k, ...); fuse once all of them are in."""
        if not isinstance(w, Fp8Weight):
            raise ValueError(f"an FP8 layer cannot load a {type(w).__name__}")
        if tuple(w.weight.shape) != (self.out_sizes[index], self.in_features):
            raise ValueError(f"FP8 weight of shape {list(w.weight.shape)} where "
                             f"[{self.out_sizes[index]}, {self.in_features}] was expected")
        self._pending[index] = w
        if len(self._pending) == len(self.out_sizes):
            parts = [self._pending.pop(i) for i in range(len(self.out_sizes))]
            self._fuse(parts)

    def _fuse(self, parts: list[Fp8Weight]) -> None:
        blocks = {p.block for p in parts}
        if len(blocks) != 1 or (parts[0].block not in (None, (BLOCK, BLOCK))):
            raise ValueError(f"FP8 blocks must be {BLOCK} x {BLOCK} for every fused part, got {sorted(map(str, blocks))}")
        self.block = parts[0].block is not None
        if self.block and (self.in_features % BLOCK or any(p.weight.shape[0] % BLOCK for p in parts)):
            raise ValueError(f"block-scaled FP8 needs sizes that are multiples of {BLOCK}")
        statics = [p.input_scale for p in parts if p.input_scale is not None]
        if statics and len(statics) != len(parts):
            raise ValueError("either every fused part has a static input scale or none has")
        # Fused parts share one activation quantization: the largest static scale keeps every part in range.
        self.input_scale = torch.stack([s.float().reshape(()) for s in statics]).max() if statics else None
        self.weight = torch.cat([p.weight for p in parts]).contiguous()
        scales = [p.scale.float() if self.block else p.scale.float().expand(p.weight.shape[0], 1) for p in parts]
        self.scale = torch.cat(scales).contiguous()
        self.gemm_scale = block_scales(self.scale) if self.block else self.scale
        self.dense = None if self._path_works(None, 17) else self._dequantized()
        gemv = self.dense is None and self.weight.is_cuda and not self.block
        self.gemv_rows = GEMV_MAX_ROWS if gemv and self._path_works("gemv", 1) and self._path_works("gemv", 3) else 0

    def _path_works(self, path: str | None, rows: int) -> bool:
        """Whether this device runs a path for these shapes and agrees with its twin (checked at load, once
        per device, shape and recipe: `_works`; cuBLAS refuses some shapes of the block recipe). Where the GEMM
        does not, the layer runs dequantized; where the GEMV does not, every call takes the GEMM."""
        if self.weight.device.type != "cuda":
            return True
        key = (self.weight.device, tuple(self.weight.shape), self.block, self.input_scale is not None, path, rows)
        if key not in _works:
            try:
                _works[key] = self._check_path(path, rows)
            except torch.OutOfMemoryError:  # says nothing of the path: this layer goes without, the next asks again
                log.warning("out of memory checking FP8 paths for a [%d, %d] weight", self.out_features,
                            self.in_features)
                return False
        return _works[key]

    def _check_path(self, path: str | None, rows: int) -> bool:
        what = "FP8 GEMV" if path == "gemv" else "FP8 GEMM"
        x = torch.randn(rows, self.in_features, device=self.weight.device, dtype=torch.bfloat16)
        path = path or choose_path(x, self.block, self.input_scale, gemv_rows=0)
        try:
            got = fp8_linear(x, self.weight, self.gemm_scale, self.block, self.input_scale, path=path).float()
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # CUBLAS_STATUS_NOT_SUPPORTED and kin, a kernel that fails to build
            log.warning("%s unavailable for a [%d, %d] weight (%s)", what, self.out_features, self.in_features, exc)
            return False
        twin = fp8_gemv.gemv_ref(x, self.weight, self.scale) if path == "gemv" else \
            linear_ref(x.float(), self.weight, self.scale, self.block, self.input_scale)
        twin = twin.float()
        ok = bool((got - twin).abs().max() <= 0.02 * twin.abs().max())
        if not ok:
            log.warning("%s disagrees with its twin for a [%d, %d] weight", what, self.out_features, self.in_features)
        return ok

    def _dequantized(self) -> torch.Tensor:
        scale = self.scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1) if self.block else self.scale
        return (self.weight.float() * scale[: self.out_features, : self.in_features]).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, in_features] -> [num_tokens, out_features]."""
        if self.dense is not None:
            return F.linear(x, self.dense.to(x.dtype), self.bias)
        path = choose_path(x, self.block, self.input_scale, self.gemv_rows)
        return fp8_linear(x, self.weight, self.gemm_scale, self.block, self.input_scale, self.bias, path)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_sizes={self.out_sizes}, block={self.block}"
