"""A sparse Mixture-of-Experts feed-forward block (Mixtral, Qwen3-MoE): each token's hidden state goes to the
top-k of E experts that a linear router picks, and their outputs are summed, weighted by the router.

The experts' weights are stacked, [E, 2 * inter, hidden] (gate | up) and [E, hidden, inter], so one fused
kernel can run them all (`kernels/fused_moe.py`); the router's softmax runs in fp32, as transformers'
does, and its top-k weights are renormalized to sum to one where the config says so.

A 4-bit checkpoint's experts (GPTQ, AWQ, compressed-tensors; groups in channel order) stay int4 on the
Triton path (`int4=True`): the kernels dequantize each tile as they read it. They arrive one linear at a
time (`load_expert` checks each index, shape and that none comes twice) and are packed once a layer's
are all in; a layer with any part the int4 kernels cannot take (8 bits, act-order, a dense expert) is
dequantized into dense stacks instead.
"""

from __future__ import annotations

import torch
from torch import nn

from llmctl.checkpoint.formats.weights import Fp8Weight, QuantizedWeight
from llmctl.runtime.kernels import fused_moe


class SparseMoe(nn.Module):
    def __init__(self, hidden: int, inter: int, num_experts: int, top_k: int, normalize: bool,
                 scores_in_fp32: bool, use_triton: bool, int4: bool = False) -> None:
        """scores_in_fp32: Mixtral weighs expert outputs with fp32 router scores; Qwen3-MoE first rounds them
        to the activations' dtype."""
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"experts per token must be in [1, {num_experts}], got {top_k}")
        self.gate = nn.Linear(hidden, num_experts, bias=False)  # the router
        self.num_experts, self.hidden, self.inter, self.int4 = num_experts, hidden, inter, int4
        self.w13: nn.Parameter | torch.Tensor | fused_moe.Int4Experts | None = None
        self.w2: nn.Parameter | torch.Tensor | fused_moe.Int4Experts | None = None
        if not int4:
            self.w13 = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))
            self.w2 = nn.Parameter(torch.empty(num_experts, hidden, inter))
        self._seen: set[tuple[int, int]] = set()
        self._int4: dict[tuple[int, int], tuple] = {}  # (expert, part) -> (codes, scales, zeros, group, rounding)
        self._loaded = False
        self.top_k, self.normalize, self.scores_in_fp32 = top_k, normalize, scores_in_fp32
        self.run = fused_moe.fused_moe if use_triton else fused_moe.fused_moe_ref

    @property
    def loaded(self) -> bool:
        return self._loaded

    @property
    def missing_parts(self) -> int:
        return 3 * self.num_experts - len(self._seen)

    def load_expert(self, expert: int, part: int, value: torch.Tensor | QuantizedWeight | Fp8Weight) -> None:
        """One linear of the experts (part 0: gate, 1: up, 2: down), dense or quantized (FP8 experts are
        dequantized); each exactly once."""
        name = f"expert {expert}'s {('gate', 'up', 'down')[part]} projection"
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"{name}: this layer has {self.num_experts} experts")
        if (expert, part) in self._seen:
            raise ValueError(f"{name} appears twice in the checkpoint")
        want = (self.inter, self.hidden) if part < 2 else (self.hidden, self.inter)
        shape = tuple(value.shape if isinstance(value, torch.Tensor)  # dense, int codes or FP8 values
                      else value.qweight.shape if isinstance(value, QuantizedWeight) else value.weight.shape)
        if shape != want:
            raise ValueError(f"{name} has shape {shape}, expected {want}")
        self._seen.add((expert, part))
        if self.int4 and isinstance(value, QuantizedWeight) and value.bits == 4 and value.in_order:
            # kept as 1-byte codes until the layer is complete: a quarter of the int32 codes' memory
            self._int4[(expert, part)] = (value.qweight.to(torch.uint8), value.scales.float(),
                                          value.zeros.to(torch.uint8), value.group_size, value.rounding)
        else:
            dense = value if isinstance(value, torch.Tensor) else value.dequantize()
            self._dense_slot(expert, part, dense.device).copy_(dense)
        if len(self._seen) == 3 * self.num_experts:
            self._finish()

    def _dense_slot(self, expert: int, part: int, device) -> torch.Tensor:
        if self.w13 is None:  # an int4 layer that meets experts the int4 kernels cannot take
            dtype = self.gate.weight.dtype
            self.w13 = torch.empty(self.num_experts, 2 * self.inter, self.hidden, dtype=dtype, device=device)
            self.w2 = torch.empty(self.num_experts, self.hidden, self.inter, dtype=dtype, device=device)
        if part == 2:
            return self.w2.data[expert]
        return self.w13.data[expert].narrow(0, part * self.inter, self.inter)

    def _finish(self) -> None:
        """Pack the int4 stacks where every linear came int4 with one group size per stack; else dequantize
        what was kept int4 into dense stacks (one kind for both: 8-bit or act-order parts, dense parts)."""
        parts, experts = self._int4, range(self.num_experts)

        def int4_stack(which: tuple[int, ...]) -> fused_moe.Int4Experts | None:
            kept = [parts.get((e, p)) for e in experts for p in which]
            if any(k is None for k in kept) or len({k[3] for k in kept}) != 1 or kept[0][3] % 16:
                return None
            def cat(i: int) -> torch.Tensor:
                return torch.stack([torch.cat([parts[(e, p)][i] for p in which]) for e in experts])
            return fused_moe.Int4Experts.pack(cat(0), cat(1), cat(2), kept[0][3])

        w13, w2 = (int4_stack((0, 1)), int4_stack((2,))) if self.w13 is None else (None, None)
        if w13 is not None and w2 is not None:
            self.w13, self.w2 = w13, w2
        else:
            for (e, p), (codes, scales, zeros, group, rounding) in parts.items():
                g = torch.arange(codes.shape[1], device=codes.device) // group
                dense = scales[:, g] * (codes.float() - zeros[:, g].float())
                self._dense_slot(e, p, codes.device).copy_(dense if rounding is None else dense.to(rounding))
        self._int4.clear()
        self._loaded = True

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [tokens, hidden] -> (weights [tokens, top_k], expert ids [tokens, top_k])."""
        logits = self.gate(x)
        weights, ids = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return (weights if self.scores_in_fp32 else weights.to(x.dtype)), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        return self.run(x, self.w13, self.w2, weights, ids)
