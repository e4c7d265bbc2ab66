"""GPTQ (Frantar et al., 2022): quantize a linear one input column at a time, pushing each column's
rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's
squared output error, H = 2 X Xᵀ over the calibration tokens.

How it runs: accumulate H from the linear's inputs; dampen its diagonal (it is often near-singular);
take the upper Cholesky factor of H⁻¹, whose rows give each column's error propagation; then sweep
the columns in blocks of 128 (the error inside a block is propagated column by column, to the rest of
the matrix once per block, as one matmul). With act-order (`desc_act`) the columns go in order of
decreasing H diagonal, so the most sensitive ones are quantized while there is most freedom left, and
g_idx records each column's group. Static groups fit every group's grid before the sweep, from the
original weights, so act-order checkpoints keep groups of consecutive channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmctl.checkpoint.formats.weights import QuantizedWeight
from llmctl.quantize.grid import check_grid, fit, quantize


class Hessian:
    """The running mean of 2 x xᵀ over the tokens seen so far: H: [in, in] float32."""

    def __init__(self, columns: int, device: torch.device) -> None:
        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # [tokens, in]
        n = x.shape[0]
        self.H.mul_(self.tokens / (self.tokens + n))
        self.tokens += n
        x = x * (2 / self.tokens) ** 0.5
        self.H.addmm_(x.T, x)


@dataclass(frozen=True)
class GPTQConfig:
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    static_groups: bool = False
    damp_percent: float = 0.01
    block_size: int = 128
    min_zero: int = 1  # GPTQ v1 stores zero - 1 (see grid.fit)
    scale_dtype: torch.dtype = torch.float16  # what the checkpoint stores scales in


def _inverse_hessian_factor(H: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹; λ grows tenfold until H is positive definite."""
    damp = damp_percent * H.diagonal().mean()
    eye = torch.eye(H.shape[0], device=H.device)
    for _ in range(5):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if info == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
        damp *= 10
    raise ValueError("the Hessian is not positive definite even with heavy dampening: check the calibration data")


@torch.no_grad()
def gptq(weight: torch.Tensor, H: torch.Tensor, cfg: GPTQConfig) -> tuple[QuantizedWeight, float]:
    """weight: [out, in], H: [in, in] -> the quantized weight and the summed weighted error ½Σ(w-q)²/d²."""
    rows, cols = weight.shape
    check_grid(cfg.bits, cfg.group_size, cols)
    size = cols if cfg.group_size == -1 else cfg.group_size
    W, H = weight.float().clone(), H.clone()
    dead = H.diagonal() == 0  # channels the calibration never excited: no information, quantize as 0
    H[dead, dead] = 1
    W[:, dead] = 0

    groups = cols // size
    scales = torch.zeros(rows, groups, device=W.device)
    zeros = torch.zeros(rows, groups, device=W.device)
    if cfg.static_groups:
        for g in range(groups):
            scales[:, g : g + 1], zeros[:, g : g + 1] = fit(W[:, g * size : (g + 1) * size], cfg.bits, cfg.sym, cfg.min_zero,
                                                             cfg.scale_dtype)

    perm = torch.argsort(H.diagonal(), descending=True) if cfg.desc_act else torch.arange(cols, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    # Position i of the sweep holds channel perm[i]; static groups stay with their channels.
    group_of = perm // size if cfg.static_groups else torch.arange(cols, device=W.device) // size
    Hinv = _inverse_hessian_factor(H, cfg.damp_percent)  # [in, in] upper triangular
    group_list = group_of.tolist()  # read per column: a host list, not one device sync per column

    Q = torch.zeros_like(W)  # integer codes, in sweep order
    loss = torch.zeros((), device=W.device)
    for i1 in range(0, cols, cfg.block_size):
        i2 = min(i1 + cfg.block_size, cols)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, device=W.device), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not cfg.static_groups and col % size == 0:
                # Fit the group's grid on its weights as updated so far (inside the block, W1 holds them).
                end = col + size
                block = W1[:, i : i + size] if end <= i2 else torch.cat([W1[:, i:], W[:, i2:end]], dim=1)
                g = col // size
                scales[:, g : g + 1], zeros[:, g : g + 1] = fit(block, cfg.bits, cfg.sym, cfg.min_zero, cfg.scale_dtype)
            g = group_list[col]
            w, d = W1[:, i], Hinv1[i, i]
            q = quantize(w, scales[:, g], zeros[:, g], cfg.bits)  # [out]
            Q[:, col] = q
            err = (w - scales[:, g] * (q - zeros[:, g])) / d
            loss += (err**2).sum() / 2
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    inv = torch.argsort(perm)
    result = QuantizedWeight(Q[:, inv].int(), scales, zeros.int(), group_of[inv].int(), cfg.bits, size)
    return result, float(loss)
