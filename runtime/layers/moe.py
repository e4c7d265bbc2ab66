"""A sparse Mixture-of-Experts feed-forward block (Mixtral, Qwen3-MoE): each token's hidden state goes to the
top-k of E experts that a linear router picks, and their outputs are summed, weighted by the router.

The experts' weights are stacked, [E, 2 * inter, hidden] (gate | up) and [E, hidden, inter], so one fused
kernel can run them all (`kernels/fused_moe.py`); the router's softmax runs in fp32, as transformers'
does, and its top-k weights are renormalized to sum to one where the config says so.

A 4-bit checkpoint's experts (GPTQ, AWQ, compressed-tensors; groups in channel order) stay int4 on the
Triton path (`int4=True`): the kernels dequantize each tile as they read it. They arrive one linear at a
time and are packed once a layer's are all in; experts the int4 kernels cannot take (8 bits, act-order)
are dequantized into the dense stacks instead.
"""

from __future__ import annotations

import torch
from torch import nn

from llmctl.checkpoint.formats.weights import QuantizedWeight
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
        self.num_experts, self.int4 = num_experts, int4
        self.w13: nn.Parameter | torch.Tensor | fused_moe.Int4Experts | None = None
        self.w2: nn.Parameter | torch.Tensor | fused_moe.Int4Experts | None = None
        if not int4:
            self.w13 = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))
            self.w2 = nn.Parameter(torch.empty(num_experts, hidden, inter))
        self._pending: dict[tuple[int, int], QuantizedWeight] = {}
        self.top_k, self.normalize, self.scores_in_fp32 = top_k, normalize, scores_in_fp32
        self.run = fused_moe.fused_moe if use_triton else fused_moe.fused_moe_ref

    @property
    def loaded(self) -> bool:
        return self.w13 is not None

    def load_expert(self, expert: int, part: int, weight: QuantizedWeight) -> None:
        """One quantized linear of an int4 layer's experts (part 0: gate, 1: up, 2: down)."""
        if not isinstance(weight, QuantizedWeight):
            raise ValueError(f"int4 experts cannot load a {type(weight).__name__}")
        self._pending[(expert, part)] = weight
        if len(self._pending) == 3 * self.num_experts:
            self._pack()

    def _pack(self) -> None:
        parts, experts = self._pending, range(self.num_experts)
        group = parts[(0, 0)].group_size
        if all(w.bits == 4 and w.group_size == group and w.in_order for w in parts.values()):
            def stack(field, which):
                return torch.stack([torch.cat([getattr(parts[(e, p)], field) for p in which]) for e in experts])
            self.w13 = fused_moe.Int4Experts.pack(stack("qweight", (0, 1)), stack("scales", (0, 1)),
                                                  stack("zeros", (0, 1)), group)
            self.w2 = fused_moe.Int4Experts.pack(stack("qweight", (2,)), stack("scales", (2,)), stack("zeros", (2,)), group)
        else:
            dtype = self.gate.weight.dtype
            self.w13 = torch.stack([torch.cat([parts[(e, 0)].dequantize(), parts[(e, 1)].dequantize()]).to(dtype)
                                    for e in experts])
            self.w2 = torch.stack([parts[(e, 2)].dequantize().to(dtype) for e in experts])
        self._pending.clear()

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
