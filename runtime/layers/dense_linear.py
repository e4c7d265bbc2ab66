"""nn.Linear whose one-row forward on CUDA may take `kernels.dense_gemv` instead of cuBLAS.

Batch-1 decode is its linears' weight bytes over the memory bandwidth; where start-up timing found the
Triton GEMV faster than cuBLAS for a weight's shape (`dense_gemv.pretune`), a one-row input takes it. Every
other input, device and shape runs F.linear, as nn.Linear does; the parameters are nn.Linear's, so loading,
tying and tensor-parallel sharding see no difference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmctl.runtime.kernels import dense_gemv


class DenseLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dim() == 2 and x.shape[0] == 1:
            cfg = dense_gemv.chosen(self.weight)
            if cfg is not None:
                return dense_gemv.gemv(x, self.weight, self.bias, cfg)
        return F.linear(x, self.weight, self.bias)
