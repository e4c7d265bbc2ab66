"""One step's device inputs, built on the host from a scheduled batch (the eager path; CUDA graphs stage
their own: cuda_graphs.py, verify_graphs.py).

Token ids of every sequence's new tokens (a speculating sequence's drafts after its newest token), their
positions, KV-cache slots, the batch's attention metadata, and the rows whose logits are sampled. A
sequence's newest token may still be pending on the device (sampled by the step before, not yet read back):
it goes as 0 with the row of the previous step's samples that holds it, and `fill_pending` writes it in
on the device. Every copy is non-blocking: a blocking one would wait for the step still running.
"""

from __future__ import annotations

import numpy as np
import torch

from llmctl.runtime.layers.attention import AttentionMetadata
from llmctl.runtime.scheduler import ScheduledBatch
from llmctl.runtime.sequence import Sequence


def prepare(batch: ScheduledBatch, pending_rows: dict[Sequence, int] | None, block_size: int, scratch_block: int,
            device: torch.device):
    """(ids, pending source rows or None, positions, AttentionMetadata, sampled rows), all on the device."""
    bs = block_size
    starts = np.fromiter((s.num_computed_tokens for s in batch.seqs), dtype=np.int64, count=len(batch))
    counts = np.asarray(batch.num_new_tokens, dtype=np.int64)
    ends = starts + counts
    ids: list[int] = []
    pending: list[tuple[int, int]] = []  # (sequence index, its token's row in the previous step's samples)
    for i, (seq, start, end, drafts) in enumerate(zip(batch.seqs, starts.tolist(), ends.tolist(), batch.drafts)):
        ids.extend(seq.token_ids[start:end])
        if drafts:  # a speculating sequence's tokens are all known; its drafts follow them
            ids.extend(drafts)
        elif end > len(seq.token_ids):  # the newest token is pending (only ever the last, one at most)
            ids.append(0)
            pending.append((i, pending_rows[seq]))
    # positions: [num_tokens]; row: [num_tokens] index of the token's sequence
    row = np.repeat(np.arange(len(batch)), counts)
    qsl = np.zeros(len(batch) + 1, dtype=np.int64)
    np.cumsum(counts, out=qsl[1:])
    src = None  # per token: its row in the previous step's samples, -1 when known
    if pending:
        src = np.full(len(ids), -1, dtype=np.int64)
        seq_index, rows = zip(*pending)
        src[qsl[1:][list(seq_index)] - 1] = rows
    positions = np.arange(len(row)) - qsl[row] + starts[row]
    width = max(len(s.block_table) for s in batch.seqs)
    tables = np.full((len(batch), width), scratch_block, dtype=np.int64)
    for i, seq in enumerate(batch.seqs):
        tables[i, : len(seq.block_table)] = seq.block_table
    slots = tables[row, positions // bs] * bs + positions % bs
    sampled = sample_rows(batch, qsl, ends)
    dev = device
    meta = AttentionMetadata(
        slot_mapping=torch.from_numpy(slots).to(dev, non_blocking=True),
        query_start_loc=torch.from_numpy(qsl.astype(np.int32)).to(dev, non_blocking=True),
        seq_lens=torch.from_numpy(ends.astype(np.int32)).to(dev, non_blocking=True),
        block_tables=torch.from_numpy(tables.astype(np.int32)).to(dev, non_blocking=True),
        max_query_len=int(counts.max()), max_seq_len=int(ends.max()),
        num_decodes=batch.num_decodes)
    return (torch.from_numpy(np.asarray(ids, dtype=np.int64)).to(dev, non_blocking=True),
            None if src is None else torch.from_numpy(src).to(dev, non_blocking=True),
            torch.from_numpy(positions).to(dev, non_blocking=True), meta,
            torch.from_numpy(sampled).to(dev, non_blocking=True))


def sample_rows(batch: ScheduledBatch, qsl: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The token rows whose logits are sampled: each sequence's last, once it has computed all its tokens;
    a speculating sequence's drafts count as new tokens, so its rows run from its last known token on."""
    num_tokens = np.fromiter((s.num_tokens for s in batch.seqs), np.int64, len(batch))
    if not batch.speculative:
        return (qsl[1:] - 1)[ends == num_tokens]
    num_drafts = np.fromiter(map(len, batch.drafts), np.int64, len(batch))
    done = np.flatnonzero(ends - num_drafts == num_tokens)
    return np.concatenate([np.arange(qsl[i + 1] - 1 - num_drafts[i], qsl[i + 1]) for i in done] or [np.empty(0, np.int64)])


def fill_pending(ids: torch.Tensor, src: torch.Tensor, tokens: torch.Tensor) -> None:
    """ids[i] = tokens[src[i]] where src[i] >= 0, on the device: the previous step's samples become inputs
    without a trip through the host."""
    ids.copy_(torch.where(src >= 0, tokens.index_select(0, src.clamp(min=0)), ids))
