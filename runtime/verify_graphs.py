"""CUDA graphs for speculative verification steps: each sequence computes its newest token and its drafts.

A verification step is a decode step with up to 1 + K tokens per sequence; eagerly its hundreds of kernel
launches cost more than the forward pass itself on a small model, which is exactly where speculation
should pay. One graph per batch size (up to the speculation's max_batch) holds size x (1 + K) token rows.
The real tokens are packed at the front, sequence after sequence, each with its own query length (the
paged attention kernels find a program's sequence from query_start_loc on the device, and a grid sized for
the total covers any split of it); the rows left over form one padding sequence, every row of it at
position 0 (a graph may hold more rows than the model has positions), that reads and writes only the scratch
block. So the sampled rows, each sequence's 1 + drafts in batch
order, are simply the first rows of the graph's logits.

Inputs are staged as DecodeGraphs stages them: a pinned host copy (two, used in turn), a few transfers.
Every token is known (the engine finishes the steps in flight before one that speculates).
"""

from __future__ import annotations

import numpy as np
import torch

from llmctl.runtime.cuda_graphs import BATCH_SIZES, capture_graphs
from llmctl.runtime.layers.attention import AttentionMetadata


class VerifyGraphs:
    def __init__(self, model, kv_caches, max_batch: int, num_drafts: int, max_blocks_per_seq: int,
                 max_model_len: int, block_size: int, scratch_block: int, device: torch.device) -> None:
        self.model, self.kv_caches = model, kv_caches
        self.block_size, self.scratch_block, self.max_model_len = block_size, scratch_block, max_model_len
        self.per_seq = 1 + num_drafts
        self.sizes = [s for s in BATCH_SIZES if s < max_batch] + [max_batch]
        rows, seqs = max_batch * self.per_seq, max_batch + 1  # (+1: the padding sequence)
        pin = device.type == "cuda"
        width = max(max_blocks_per_seq, -(-rows // block_size))  # the padding sequence's table may be the widest
        # ints rows: token ids, positions, slots; query_start_loc, seq_lens and block tables apart (int32)
        self.host = [(torch.zeros(3, rows, dtype=torch.long, pin_memory=pin),
                      torch.zeros(seqs + 1, dtype=torch.int32, pin_memory=pin),
                      torch.zeros(seqs, dtype=torch.int32, pin_memory=pin),
                      torch.full((seqs, width), scratch_block, dtype=torch.int32, pin_memory=pin)) for _ in range(2)]
        self.turn = 0
        self.ints, self.qsl, self.seq_lens, self.tables = (t.to(device) for t in self.host[0])
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def capture(self, pool=None):
        """Capture every size (largest first, into `pool`, the decode graphs'); returns the pool."""
        for size in reversed(self.sizes):
            self._stage_padding(0, size)
            graphs, logits, pool = capture_graphs([size], self._forward, pool)
            self.graphs.update(graphs)
            self.logits.update(logits)
        self.graphs = dict(sorted(self.graphs.items()))
        return pool

    def _forward(self, size: int) -> torch.Tensor:
        rows = size * self.per_seq
        meta = AttentionMetadata(self.ints[2, :rows], self.qsl[: size + 2], self.seq_lens[: size + 1],
                                 self.tables[: size + 1], rows, self.max_model_len)
        hidden = self.model(self.ints[0, :rows], self.ints[1, :rows], self.kv_caches, meta)
        return self.model.compute_logits(hidden)

    def size_for(self, batch_size: int) -> int | None:
        return next((size for size in self.sizes if size >= batch_size), None)

    def device_buffers(self, size: int) -> list[torch.Tensor]:
        """The inputs a replay of `size` reads, as contiguous tensors (what tensor parallelism broadcasts)."""
        return [self.ints, self.qsl, self.seq_lens, self.tables[: size + 1]]

    def stage(self, seqs, drafts: list[list[int]], size: int) -> int:
        """Send the inputs of sequences that each compute their newest token and then their drafts; returns
        the number of real rows."""
        host_ints, host_qsl, host_lens, host_tables = self.host[self.turn]
        self.turn ^= 1
        ints, qsl, lens, tables = host_ints.numpy(), host_qsl.numpy(), host_lens.numpy(), host_tables.numpy()
        bs, row = self.block_size, 0
        for i, (seq, guess) in enumerate(zip(seqs, drafts)):
            pos, n = seq.num_computed_tokens, 1 + len(guess)
            ints[0, row], ints[0, row + 1: row + n] = seq.token_ids[pos], guess
            positions = np.arange(pos, pos + n)
            table = seq.block_table
            ints[1, row: row + n] = positions
            ints[2, row: row + n] = np.asarray(table)[positions // bs] * bs + positions % bs
            qsl[i] = row
            lens[i] = pos + n
            tables[i, : len(table)] = table  # entries past the sequence's length are never read
            row += n
        width = self._pad(ints, qsl, lens, tables, len(seqs), row, size)
        width = max([width, *(len(s.block_table) for s in seqs)])
        rows = size * self.per_seq
        self.ints[:, :rows].copy_(host_ints[:, :rows], non_blocking=True)
        self.qsl[: size + 2].copy_(host_qsl[: size + 2], non_blocking=True)
        self.seq_lens[: size + 1].copy_(host_lens[: size + 1], non_blocking=True)
        self.tables[: size + 1, :width].copy_(host_tables[: size + 1, :width], non_blocking=True)
        return row

    def _pad(self, ints, qsl, lens, tables, n: int, row: int, size: int) -> int:
        """Rows [row, size x per_seq) become sequence n, all at position 0, on the scratch block; sequences
        n + 1 ... size are empty. Returns the block-table width the padding sequence reads."""
        rows = size * self.per_seq
        ints[0, row:rows] = 0
        ints[1, row:rows] = 0  # (positions feed only the rotary table, which may be shorter than the rows)
        ints[2, row:rows] = self.scratch_block * self.block_size
        qsl[n] = row
        qsl[n + 1: size + 2] = rows
        lens[n] = rows - row
        lens[n + 1: size + 1] = 0
        width = max(1, -(-(rows - row) // self.block_size))
        tables[n, :width] = self.scratch_block
        return width

    def _stage_padding(self, n: int, size: int) -> None:
        """Device inputs of a batch that is all padding (what a capture runs on)."""
        host_ints, host_qsl, host_lens, host_tables = self.host[self.turn]
        width = self._pad(host_ints.numpy(), host_qsl.numpy(), host_lens.numpy(), host_tables.numpy(), n, 0, size)
        self.ints.copy_(host_ints)
        self.qsl.copy_(host_qsl)
        self.seq_lens.copy_(host_lens)
        self.tables[:, :width].copy_(host_tables[:, :width])

    def replay(self, rows: int, size: int) -> torch.Tensor:
        """Logits [rows, vocab] of the staged batch's real rows."""
        if size in self.graphs:
            self.graphs[size].replay()
            return self.logits[size][:rows]
        return self._forward(size)[:rows]  # not captured (a CPU run): the same inputs, eagerly
