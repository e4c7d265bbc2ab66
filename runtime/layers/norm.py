"""RMSNorm with an optional fused residual add; computed in fp32 and cast back as transformers does."""

from __future__ import annotations

import torch
from torch import nn

from llmctl.runtime.kernels import fused


class RMSNorm(nn.Module):
    """plus_one: Gemma's form, which scales by (1 + weight) in fp32 (its weights are stored off by one)."""

    def __init__(self, hidden_size: int, eps: float, use_triton: bool = False, plus_one: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.use_triton = use_triton
        self.plus_one = plus_one

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x: [num_tokens, hidden]. With residual: returns (norm(x + residual), x + residual)."""
        norm = fused.rms_norm if self.use_triton else fused.rms_norm_ref
        return norm(x, self.weight, self.eps, residual, self.plus_one)
