"""AWQ (Lin et al., 2023): protect the weights that see large activations by scaling them up before
rounding, and fold the inverse scale into whatever produces their input, so the float function is
unchanged and only the rounding error moves.

How it runs on one decoder layer: the linears that share an input are searched together, each with
the op that produces that input (norm → q/k/v, norm → gate/up, up → down, and v → o when v's output
is o's whole input, i.e. without grouped-query attention). Per input channel the scale is
s = mean|x|^α / mean|w|^(1-α); α goes over a grid of 20 and the winner minimizes the squared error
of the block's output (the attention or MLP block, or the single linear) against the float output.
Then, for every linear but q and k (their error is squared by the q·k product, clipping them hurts),
a clipping search shrinks each group's range by up to half where that lowers the linear's own output
error. The last step is plain round-to-nearest on the scaled, clipped weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from llmctl.quantize.grid import fake_quantize_groups

N_GRID = 20
MAX_SHRINK = 0.5
CLIP_TOKENS = 512  # tokens the clipping search scores on, as AutoAWQ does


@dataclass
class ScaleGroup:
    prev: nn.Module  # an RMSNorm or a Linear whose output feeds `linears`
    linears: list[nn.Linear]
    block: Callable[[torch.Tensor], torch.Tensor]  # the float function scored: x -> output
    inputs: torch.Tensor  # [samples, seq, in] the linears' input on the search samples
    x_mean: torch.Tensor  # [in] mean |x| over all calibration tokens


@torch.no_grad()
def search_scale(group: ScaleGroup, bits: int, group_size: int, sym: bool,
                 scale_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The best per-input-channel scale s: [in] for the group."""
    weight = torch.cat([fc.weight for fc in group.linears]).float()  # [sum(out), in]
    size = weight.shape[1] if group_size == -1 else group_size
    # How big each weight is relative to its quantization group, averaged per input channel.
    rel = weight.abs().view(-1, size) / (weight.abs().view(-1, size).amax(dim=1, keepdim=True) + 1e-6)
    w_mean = rel.view_as(weight).mean(0)  # [in]
    x_mean = group.x_mean.float()
    reference = group.block(group.inputs).float()
    originals = [fc.weight.data.clone() for fc in group.linears]
    best, best_error = torch.ones_like(x_mean), float("inf")
    for step in range(N_GRID):
        alpha = step / N_GRID
        s = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1 so fp16 weights stay in range
        s = torch.nan_to_num(s, nan=1.0, posinf=1.0)
        for fc, w in zip(group.linears, originals):
            fc.weight.data = (fake_quantize_groups(w.float() * s, bits, group_size, sym, scale_dtype) / s).to(w.dtype)
        error = (group.block(group.inputs).float() - reference).pow(2).mean().item()
        if error < best_error:
            best, best_error = s.clone(), error
    for fc, w in zip(group.linears, originals):
        fc.weight.data = w
    return best


@torch.no_grad()
def apply_scale(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor, plus_one: bool = False) -> None:
    """Fold 1/s into the op before and s into the linears: the float function is unchanged. plus_one: prev
    is a norm that scales by (1 + weight) (Gemma), so (1 + weight) is what is divided."""
    if isinstance(prev, nn.Linear):
        # prev's last len(s) output rows feed the linears (all of them for up_proj and v_proj).
        prev.weight[-len(s):].div_(s.view(-1, 1).to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias[-len(s):].div_(s.to(prev.bias.dtype))
    elif plus_one:
        prev.weight.copy_(((1 + prev.weight.float()) / s.float() - 1).to(prev.weight.dtype))
    else:
        prev.weight.div_(s.to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    for fc in linears:
        fc.weight.mul_(s.view(1, -1).to(fc.weight.dtype))


@torch.no_grad()
def search_clip(weight: torch.Tensor, x: torch.Tensor, bits: int, group_size: int, sym: bool,
                out_chunk: int = 256, scale_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """weight: [out, in], x: [tokens, in] -> max |w| per (out, group): [out, groups, 1]."""
    out, cols = weight.shape
    size = cols if group_size == -1 else group_size
    x = x.reshape(-1, cols)
    x = x[:: max(1, x.shape[0] // CLIP_TOKENS)].float().view(-1, cols // size, size)  # [tokens, groups, size]
    best_all = []
    for w in weight.float().split(out_chunk):
        w = w.view(-1, cols // size, size)  # [o, groups, size]
        reference = torch.einsum("tgk,ogk->otg", x, w)
        org_max = w.abs().amax(dim=-1, keepdim=True)  # [o, groups, 1]
        best_max, best_err = org_max.clone(), torch.full_like(org_max, float("inf"))
        for step in range(int(MAX_SHRINK * N_GRID)):
            max_val = org_max * (1 - step / N_GRID)
            clipped = torch.clamp(w, -max_val, max_val)
            q = fake_quantize_groups(clipped.reshape(-1, cols), bits, group_size, sym, scale_dtype).view_as(w)
            err = (torch.einsum("tgk,ogk->otg", x, q) - reference).pow(2).mean(dim=1, keepdim=True)  # [o, 1, g]
            err = err.transpose(1, 2)  # [o, groups, 1]
            better = err < best_err
            best_err, best_max = torch.where(better, err, best_err), torch.where(better, max_val, best_max)
        best_all.append(best_max)
    return torch.cat(best_all)


@torch.no_grad()
def apply_clip(fc: nn.Linear, max_val: torch.Tensor) -> None:
    out, cols = fc.weight.shape
    w = fc.weight.data.view(out, max_val.shape[1], -1)  # [out, groups, size]
    fc.weight.data = torch.clamp(w, -max_val.to(w.dtype), max_val.to(w.dtype)).view(out, cols)
