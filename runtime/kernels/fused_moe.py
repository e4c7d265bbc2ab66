"""Experts applied to routed tokens: out[t] = sum_j w[t, j] * down_e(SiLU(gate_e(x[t])) * up_e(x[t])), e = ids[t, j].

`fused_moe_ref` is the torch twin and the CPU path: expert by expert over the tokens routed to it, as
transformers computes it (its sums happen in the same order). `fused_moe` is the CUDA path, two grouped
GEMMs in Triton:

1. `align`: the (token, slot) rows sorted by expert, each expert's run padded to a multiple of BLOCK_M
   (pad rows point past the end), and each block's expert. Experts nobody picked get no block at all, so
   the blocks in use are the first `cdiv(rows, BLOCK_M) + min(E, rows)` at most: the grid is sized by that
   bound, with no host sync, and the decode step stays capturable in a CUDA graph.
2. `_up_kernel`: a block of rows times its expert's gate and up tiles, SiLU(gate) * up in fp32, one store
   of h [rows, inter]; each expert weight tile is read once per block.
3. `_down_kernel`: h times the expert's down tile, scaled by the router weight, stored per row; the top-k
   rows of each token are then summed (in fp32 by torch's reduction).

Block sizes are timed once per (shape, dtype, M bucket) on the GPU (`fused_moe_tune`, cached in memory; the
runtime pretunes at start-up like the W4A16 kernels); under Triton's interpreter, large blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llmctl.runtime.kernels.compiling import start


def _check(x, w13, w2, weights, ids) -> None:
    if x.dim() != 2 or len(w13.shape) != 3 or len(w2.shape) != 3:
        raise ValueError(f"x must be [tokens, hidden] and the experts [E, 2 * inter, hidden], [E, hidden, inter]; "
                         f"got {tuple(x.shape)}, {tuple(w13.shape)}, {tuple(w2.shape)}")
    experts, two_inter, hidden = w13.shape
    if x.shape[1] != hidden or w2.shape != (experts, hidden, two_inter // 2):
        raise ValueError(f"expert shapes {tuple(w13.shape)} and {tuple(w2.shape)} do not fit x {tuple(x.shape)}")
    if weights.shape != ids.shape or weights.shape[0] != x.shape[0]:
        raise ValueError(f"weights and ids must both be [tokens, top_k], got {tuple(weights.shape)}, {tuple(ids.shape)}")


@dataclass
class Int4Experts:
    """Stacked int4 expert weights, W[e][n, k] = scales[e, k // group, n] * (code - zeros[e, k // group, n]);
    codes [E, K / 8, N] int32 hold eight 4-bit codes along K a word (GPTQ's qweight layout, per expert),
    scales [E, K / group, N] float32, zeros [E, K / group, N] uint8. Groups follow channel order."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """(E, N, K), as a dense stack's."""
        e, k8, n = self.codes.shape
        return e, n, k8 * 8

    @classmethod
    def pack(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> Int4Experts:
        """codes [E, N, K] in [0, 15]; scales, zeros [E, N, K / group]."""
        e, n, k = codes.shape
        if k % 8 or k % group_size:
            raise ValueError(f"int4 experts need K ({k}) a multiple of 8 and of the group size ({group_size})")
        lanes = codes.transpose(1, 2).reshape(e, k // 8, 8, n).to(torch.int32)
        words = torch.zeros(e, k // 8, n, dtype=torch.int32, device=codes.device)
        for j in range(8):
            words |= lanes[:, :, j] << (4 * j)
        return cls(words, scales.transpose(1, 2).float().contiguous(), zeros.transpose(1, 2).to(torch.uint8).contiguous(),
                   group_size)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """[E, N, K] in dtype, rounded once from the fp32 product as the kernels do."""
        shifts = torch.arange(0, 32, 4, device=self.codes.device, dtype=torch.int32)
        codes = (self.codes[:, :, None, :] >> shifts[None, None, :, None]) & 0xF  # [E, K / 8, 8, N]
        codes = codes.reshape(self.codes.shape[0], -1, self.codes.shape[2]).float()  # [E, K, N]
        scales = self.scales.repeat_interleave(self.group_size, dim=1)
        zeros = self.zeros.repeat_interleave(self.group_size, dim=1).float()
        return ((codes - zeros) * scales).to(dtype).transpose(1, 2).contiguous()


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                  ids: torch.Tensor) -> torch.Tensor:
    """x: [tokens, hidden]; w13: [E, 2 * inter, hidden]; w2: [E, hidden, inter]; weights, ids: [tokens, top_k]."""
    _check(x, w13, w2, weights, ids)
    w13, w2 = (w.dequantize(x.dtype) if isinstance(w, Int4Experts) else w for w in (w13, w2))
    out = torch.zeros_like(x)
    for expert in ids.unique().tolist():
        slot, token = torch.where(expert == ids.T)  # slot-major rows, as transformers gathers them
        gate, up = F.linear(x[token], w13[expert]).chunk(2, dim=-1)
        h = F.linear(F.silu(gate) * up, w2[expert]) * weights[token, slot, None]
        out.index_add_(0, token, h.to(out.dtype))
    return out


def align(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [tokens, top_k] -> (rows [blocks * block_m]: flat (token * top_k + slot) indices sorted by expert,
    tokens * top_k where padding; block_expert [blocks]: each block's expert, num_experts past the used ones)."""
    flat = ids.flatten()
    n = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # bincount would sync to size its output
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    blocks = triton.cdiv(n, block_m) + min(num_experts, n)  # at most this many blocks hold rows
    order = torch.sort(flat, stable=True).indices
    expert_of = flat[order]
    rank = torch.arange(n, device=ids.device) - (counts.cumsum(0) - counts)[expert_of]
    rows = torch.full((blocks * block_m,), n, dtype=torch.int32, device=ids.device)
    rows[(ends - padded)[expert_of] + rank] = order.to(torch.int32)
    starts = torch.arange(0, blocks * block_m, block_m, device=ids.device)
    block_expert = torch.searchsorted(ends, starts, right=True).to(torch.int32)
    return rows, block_expert


@triton.jit
def _b_tile(w_ptr, s_ptr, z_ptr, e, k0, k, cols, mask, K, N, GROUP: tl.constexpr, INT4: tl.constexpr,
            DTYPE: tl.constexpr):
    """[BLOCK_K, BLOCK_N] of expert e's W.T: dense W is [E, N, K]; int4 W is codes [E, K / 8, N] (eight
    along K a word), scales and zeros [E, K / GROUP, N], dequantized as (code - zero) * scale in fp32. An
    int4 tile lies inside one group (BLOCK_K divides GROUP): its scales and zeros are one row each."""
    if INT4:
        words = tl.load(w_ptr + e * (K // 8) * N + (k[:, None] // 8) * N + cols[None, :], mask=mask, other=0)
        codes = ((words >> ((k[:, None] % 8) * 4)) & 0xF).to(tl.float32)
        col_ok = cols < N
        at = e * (K // GROUP) * N + (k0 // GROUP) * N + cols
        zero = tl.load(z_ptr + at, mask=col_ok, other=0).to(tl.float32)
        scale = tl.load(s_ptr + at, mask=col_ok, other=0.0)
        return ((codes - zero[None, :]) * scale[None, :]).to(DTYPE)
    else:
        return tl.load(w_ptr + e * N * K + cols[None, :].to(tl.int64) * K + k[:, None], mask=mask, other=0.0)


@triton.jit
def _up_kernel(x_ptr, w_ptr, s_ptr, z_ptr, h_ptr, rows_ptr, expert_ptr, n_rows, E, H, INTER, TOP_K: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
               GROUP: tl.constexpr, INT4: tl.constexpr):
    pid_m, pid_n = tl.program_id(1), tl.program_id(0)
    e = tl.load(expert_ptr + pid_m).to(tl.int64)
    if e >= E:
        return
    rows = tl.load(rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = rows < n_rows
    tokens = (rows // TOP_K).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < INTER
    ks = tl.arange(0, BLOCK_K)
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dtype = x_ptr.dtype.element_ty
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        a = tl.load(x_ptr + tokens[:, None] * H + k[None, :], mask=valid[:, None] & (k[None, :] < H), other=0.0)
        b_mask = (k[:, None] < H) & col_ok[None, :]
        b_gate = _b_tile(w_ptr, s_ptr, z_ptr, e, k0, k, cols, b_mask, H, 2 * INTER, GROUP, INT4, dtype)
        b_up = _b_tile(w_ptr, s_ptr, z_ptr, e, k0, k, cols + INTER, b_mask, H, 2 * INTER, GROUP, INT4, dtype)
        gate = tl.dot(a, b_gate, gate, input_precision=PRECISION)
        up = tl.dot(a, b_up, up, input_precision=PRECISION)
    h = gate / (1.0 + tl.exp(-gate)) * up
    out = h_ptr + rows[:, None].to(tl.int64) * INTER + cols[None, :]
    tl.store(out, h.to(h_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(h_ptr, w_ptr, s_ptr, z_ptr, y_ptr, weights_ptr, rows_ptr, expert_ptr, n_rows, E, H, INTER,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                 GROUP: tl.constexpr, INT4: tl.constexpr):
    pid_m, pid_n = tl.program_id(1), tl.program_id(0)
    e = tl.load(expert_ptr + pid_m).to(tl.int64)
    if e >= E:
        return
    rows = tl.load(rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = rows < n_rows
    rows64 = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, INTER, BLOCK_K):
        k = k0 + ks
        a = tl.load(h_ptr + rows64[:, None] * INTER + k[None, :], mask=valid[:, None] & (k[None, :] < INTER), other=0.0)
        b = _b_tile(w_ptr, s_ptr, z_ptr, e, k0, k, cols, (k[:, None] < INTER) & col_ok[None, :], INTER, H, GROUP, INT4,
                    h_ptr.dtype.element_ty)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    acc = acc * tl.load(weights_ptr + rows, mask=valid, other=0.0)[:, None]
    tl.store(y_ptr + rows64[:, None] * H + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=valid[:, None] & col_ok[None, :])


def operands(w) -> tuple:
    """(weight, scales, zeros, group, int4) as the kernels take them; dense weights pass themselves thrice."""
    if isinstance(w, Int4Experts):
        return w.codes, w.scales, w.zeros, w.group_size, True
    return w, w, w, 1, False


def launch(x, w13, w2, weights, ids, cfg) -> torch.Tensor:
    tokens, top_k = ids.shape
    experts, two_inter, hidden = w13.shape
    inter = two_inter // 2
    bm, (bn1, bk1, warps1, stages1), (bn2, bk2, warps2, stages2) = cfg
    for w, bk in ((w13, bk1), (w2, bk2)):
        if isinstance(w, Int4Experts) and w.group_size % bk:
            raise ValueError(f"an int4 K tile must lie inside one group: block_k {bk}, group size {w.group_size}")
    n_rows = tokens * top_k
    rows, block_expert = align(ids, experts, bm)
    blocks = block_expert.numel()
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    h = torch.empty(n_rows, inter, dtype=x.dtype, device=x.device)
    w, s, z, group, int4 = operands(w13)
    start(_up_kernel, (triton.cdiv(inter, bn1), blocks),
          x, w, s, z, h, rows, block_expert, n_rows, experts, hidden, inter, TOP_K=top_k, BLOCK_M=bm, BLOCK_N=bn1,
          BLOCK_K=bk1, PRECISION=precision, GROUP=group, INT4=int4, num_warps=warps1, num_stages=stages1)
    y = torch.empty(n_rows, hidden, dtype=x.dtype, device=x.device)
    w, s, z, group, int4 = operands(w2)
    start(_down_kernel, (triton.cdiv(hidden, bn2), blocks),
          h, w, s, z, y, weights.float().contiguous(), rows, block_expert, n_rows, experts, hidden, inter,
          BLOCK_M=bm, BLOCK_N=bn2, BLOCK_K=bk2, PRECISION=precision, GROUP=group, INT4=int4, num_warps=warps2,
          num_stages=stages2)
    return y.view(tokens, top_k, hidden).sum(dim=1)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor, cfg: tuple | None = None) -> torch.Tensor:
    """The Triton path (on CPU under TRITON_INTERPRET); same arguments as `fused_moe_ref`."""
    _check(x, w13, w2, weights, ids)
    if not x.is_contiguous() or not all(w.codes.is_contiguous() if isinstance(w, Int4Experts) else w.is_contiguous()
                                         for w in (w13, w2)):
        raise ValueError("x and the expert weights must be contiguous")
    if x.shape[0] == 0:
        return torch.zeros_like(x)
    if cfg is None:
        from llmctl.runtime.kernels.fused_moe_tune import (
            choose,  # it times `launch`: imported when first needed
        )

        cfg = choose(x, w13, w2, weights, ids)
    return launch(x, w13, w2, weights, ids.contiguous(), cfg)
