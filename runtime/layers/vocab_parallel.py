"""The embedding and the LM head split by vocabulary over tensor-parallel ranks (parallel.py).

Rank r holds the rows [r P, (r + 1) P) of the [vocab, hidden] matrices, P = ceil(vocab / N) (the last
rank's rows past the vocabulary are zeros): 1 / N of what were the two largest replicated tensors (a
128k-token vocabulary at hidden 8192 is 2 GiB each in bf16). The embedding looks up the ids in its range,
writes zeros for the others, and the ranks' rows are summed (all-reduce). The head computes its slice of
each row's logits, and the slices are gathered so that rank 0, which samples, has them all: every rank
calls it for the same rows (rank 0 sends them, parallel.send_logits_rows).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def vocab_range(vocab_size: int, tp) -> tuple[int, int, int]:
    """(first row, rows of the vocabulary, rows held) of this rank's slice."""
    per = -(-vocab_size // tp.size)
    first = tp.rank * per
    return first, max(0, min(per, vocab_size - first)), per


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp) -> None:
        super().__init__()
        self.tp, self.vocab_size = tp, vocab_size
        self.first, self.count, per = vocab_range(vocab_size, tp)
        self.weight = nn.Parameter(torch.empty(per, hidden_size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.first
        mine = (local >= 0) & (local < self.count)
        out = F.embedding(torch.where(mine, local, 0), self.weight) * mine.unsqueeze(1).to(self.weight.dtype)
        return self.tp.all_reduce(out)


class VocabParallelHead(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp) -> None:
        super().__init__()
        self.tp, self.vocab_size = tp, vocab_size
        self.weight = nn.Parameter(torch.empty(vocab_range(vocab_size, tp)[2], hidden_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, hidden] -> [rows, vocab] on every rank (a collective: all ranks call it for the same rows)."""
        local = F.linear(hidden, self.weight).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.tp.size)]
        dist.all_gather(parts, local)
        return torch.cat(parts, dim=1)[:, : self.vocab_size]


def pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """A slice of the vocabulary's rows, zero-padded to the rows a rank holds."""
    if weight.shape[0] == rows:
        return weight
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], *weight.shape[1:])])
