"""A sparse Mixture-of-Experts feed-forward block (Mixtral, Qwen3-MoE): each token's hidden state goes to the
top-k of E experts that a linear router picks, and their outputs are summed, weighted by the router.

The experts' weights are stacked, [E, 2 * inter, hidden] (gate | up) and [E, hidden, inter], so one fused
kernel can run them all (`kernels/fused_moe.py`); the router's softmax runs in fp32, as transformers'
does, and its top-k weights are renormalized to sum to one where the config says so.
"""

from __future__ import annotations

import torch
from torch import nn

from llmctl.runtime.kernels import fused_moe


class SparseMoe(nn.Module):
    def __init__(self, hidden: int, inter: int, num_experts: int, top_k: int, normalize: bool,
                 scores_in_fp32: bool, use_triton: bool) -> None:
        """scores_in_fp32: Mixtral weighs expert outputs with fp32 router scores; Qwen3-MoE first rounds them
        to the activations' dtype."""
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"experts per token must be in [1, {num_experts}], got {top_k}")
        self.gate = nn.Linear(hidden, num_experts, bias=False)  # the router
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, inter))
        self.top_k, self.normalize, self.scores_in_fp32 = top_k, normalize, scores_in_fp32
        self.run = fused_moe.fused_moe if use_triton else fused_moe.fused_moe_ref

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
