"""CUDA graphs for decode steps: one captured forward per batch size, replayed with new inputs.

A decode step of a 32-layer model launches hundreds of kernels; replaying a graph launches them
all at once. Inputs live in static device buffers; each step fills a pinned host copy of them and
sends it in three transfers. The engine fills step n + 1's copy while step n still runs, so there are
two host copies, used in turn: step n - 1's transfer, the one that could still be reading the copy
written now, is done once the engine has step n - 1's tokens, which it waits for before it schedules
step n + 1. A batch of n sequences replays the smallest captured size >= n; the rows past n are padding
that reads and writes only the scratch block, with length 1.
"""

from __future__ import annotations

import numpy as np
import torch

from llmctl.runtime.kernels import compiling
from llmctl.runtime.layers.attention import AttentionMetadata

BATCH_SIZES = [1, 2, 4, 8] + list(range(16, 1025, 16))


def capture_graphs(sizes: list[int], forward, pool=None) -> tuple[dict[int, torch.cuda.CUDAGraph], dict, object]:
    """A graph of forward(size) for each size, with what each returns; largest first, so that the others
    fit in its memory pool. Returns the graphs and outputs by size, and the pool."""
    graphs, outputs = {}, {}
    if not torch.distributed.is_initialized():  # every kernel of every size compiled on all cores first (not
        with torch.inference_mode():              # under TP: a rank that stopped early would hang the others)
            compiling.ahead(lambda size=size: forward(size) for size in sorted(sizes, reverse=True))
    for size in sorted(sizes, reverse=True):
        with torch.inference_mode():
            for _ in range(2):  # Triton compiles and cuBLAS picks kernels outside the capture
                forward(size)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):  # (see timing)
                outputs[size] = forward(size)
        pool = graph.pool()
        graphs[size] = graph
    torch.cuda.synchronize()
    return dict(sorted(graphs.items())), outputs, pool


class DecodeGraphs:
    def __init__(self, model, kv_caches, max_batch: int, max_blocks_per_seq: int, max_model_len: int,
                 block_size: int, scratch_block: int, device: torch.device) -> None:
        self.model, self.kv_caches = model, kv_caches
        self.block_size, self.scratch_block, self.max_model_len = block_size, scratch_block, max_model_len
        self.max_batch = min(max_batch, BATCH_SIZES[-1])
        self.sizes = [s for s in BATCH_SIZES if s < self.max_batch] + [self.max_batch]
        pin = device.type == "cuda"
        # inputs rows: token ids, positions, slots, and where a pending token id is (its row in the previous
        # step's sampled tokens, -1 for a known one); seq_lens and block tables apart (int32)
        self.host = [(torch.zeros(4, self.max_batch, dtype=torch.long, pin_memory=pin),
                      torch.ones(self.max_batch, dtype=torch.int32, pin_memory=pin),
                      torch.full((self.max_batch, max_blocks_per_seq), scratch_block, dtype=torch.int32,
                                 pin_memory=pin)) for _ in range(2)]
        self.turn = 0
        self.inputs, self.seq_lens, self.block_tables = (t.to(device) for t in self.host[0])
        self.query_start_loc = torch.arange(self.max_batch + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def capture(self, pool=None):
        """Capture every batch size; returns the graphs' memory pool (verification graphs share it)."""
        self.inputs[2].fill_(self.scratch_block * self.block_size)
        self.graphs, self.logits, pool = capture_graphs(self.sizes, self._forward, pool)
        return pool

    def _forward(self, size: int) -> torch.Tensor:
        meta = AttentionMetadata(self.inputs[2, :size], self.query_start_loc[: size + 1], self.seq_lens[:size],
                                 self.block_tables[:size], 1, self.max_model_len)
        hidden = self.model(self.inputs[0, :size], self.inputs[1, :size], self.kv_caches, meta)
        return self.model.compute_logits(hidden)

    def size_for(self, batch_size: int) -> int | None:
        return next((size for size in self.sizes if size >= batch_size), None)

    def device_buffers(self, size: int) -> list[torch.Tensor]:
        """The inputs a replay of `size` reads, as contiguous tensors (what tensor parallelism broadcasts)."""
        return [self.inputs, self.seq_lens, self.block_tables[:size]]

    def stage(self, seqs, size: int, pending_rows: dict | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Send the inputs of sequences that each compute their one newest token. A token still pending
        (see Sequence.num_pending) goes as 0 with its row in pending_rows; returns the device's (token ids,
        rows) for the caller to fill those in, or None when every id is known."""
        n, bs = len(seqs), self.block_size
        host_inputs, host_lens, host_tables = self.host[self.turn]
        self.turn ^= 1
        inputs, tables, lens = host_inputs.numpy(), host_tables.numpy(), host_lens.numpy()
        any_pending = False
        for i, seq in enumerate(seqs):
            pos = seq.num_computed_tokens
            table = seq.block_table
            if pos < len(seq.token_ids):
                inputs[0, i], inputs[3, i] = seq.token_ids[pos], -1
            else:
                inputs[0, i], inputs[3, i] = 0, pending_rows[seq]
                any_pending = True
            inputs[1, i] = pos
            inputs[2, i] = table[pos // bs] * bs + pos % bs
            lens[i] = pos + 1
            tables[i, : len(table)] = table  # entries past the sequence's length are never read
        inputs[:, n:size] = np.array([[0], [0], [self.scratch_block * bs], [-1]])
        lens[n:size] = 1
        tables[n:size, 0] = self.scratch_block
        width = max(len(s.block_table) for s in seqs)
        self.inputs[:, :size].copy_(host_inputs[:, :size], non_blocking=True)
        self.seq_lens[:size].copy_(host_lens[:size], non_blocking=True)
        self.block_tables[:size, :width].copy_(host_tables[:size, :width], non_blocking=True)
        return (self.inputs[0, :size], self.inputs[3, :size]) if any_pending else None

    def replay(self, n: int, size: int) -> torch.Tensor:
        """Logits [n, vocab] of the staged batch."""
        if size in self.graphs:
            self.graphs[size].replay()
            return self.logits[size][:n]
        return self._forward(size)[:n]  # not captured (the staging tested on CPU): the same inputs, eagerly
