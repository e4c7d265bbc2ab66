"""A linear layer over int4 weights (GPTQ, AWQ, compressed-tensors): packed once at load, W4A16 kernels on the forward.

The model builds one `Int4Linear` per projection with the output sizes of the checkpoint modules it
fuses (q | k | v, gate | up), on the meta device and without tensors: the packed shapes depend on
what the checkpoint holds (act-order or not), so they are made in `load`. Parts that share input
groups and act-order are concatenated along N into one kernel call; parts that do not (GPTQ act-order
orders channels per module) stay separate calls whose outputs are concatenated.
"""

from __future__ import annotations

import torch
from torch import nn

from llmctl.checkpoint.formats.weights import QuantizedWeight
from llmctl.runtime.kernels import w4a16
from llmctl.runtime.kernels.w4a16 import PackedW4


class Int4Linear(nn.Module):
    """y = x @ W.T (+ bias) for W stored as int4; out_sizes: the fused modules' output sizes, in order."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_sizes = in_features, list(out_sizes)
        self.out_features = sum(out_sizes)
        self.bias = nn.Parameter(torch.empty(self.out_features)) if bias else None
        self.packed: list[PackedW4] = []  # after load: runs of parts fused along N
        self._pending: dict[int, PackedW4] = {}

    def load(self, index: int, weight: QuantizedWeight) -> None:
        """Take checkpoint module `index` (0: q, 1: k, ...); pack once all of them are in."""
        if not isinstance(weight, QuantizedWeight):
            raise ValueError(f"an int4 layer cannot load a {type(weight).__name__}")
        w = w4a16.from_quantized(weight)
        if w.in_features != self.in_features or w.out_features != self.out_sizes[index]:
            raise ValueError(f"int4 weight of shape [{w.out_features}, {w.in_features}] where "
                             f"[{self.out_sizes[index]}, {self.in_features}] was expected")
        self._pending[index] = w
        if len(self._pending) == len(self.out_sizes):
            runs: list[list[PackedW4]] = []
            for i in range(len(self.out_sizes)):
                part = self._pending[i]
                if runs and w4a16.can_concat(runs[-1][0], part):
                    runs[-1].append(part)
                else:
                    runs.append([part])
            self.packed = [w4a16.concat(run) if len(run) > 1 else run[0] for run in runs]
            self._pending.clear()

    @property
    def loaded(self) -> bool:
        return bool(self.packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, in_features] -> [num_tokens, out_features]."""
        if len(self.packed) == 1:
            return w4a16.w4a16_linear(x, self.packed[0], self.bias)
        outs = [w4a16.w4a16_linear(x, w) for w in self.packed]
        out = torch.cat(outs, dim=-1)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_sizes={self.out_sizes}, kernels={len(self.packed)}"
