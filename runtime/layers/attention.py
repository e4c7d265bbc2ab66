"""Paged attention: rotate q and k, store this step's K/V into the cache, then attend over each sequence's blocks.

The batch's layout arrives explicitly as `AttentionMetadata` (no global context). The Triton
kernels run on CUDA; their plain-torch twins run everywhere else and compute the same function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmctl.runtime.kernels import kv_store, paged_attention
from llmctl.runtime.layers.rotary import RotaryEmbedding


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot (block * block_size + offset) of each new token
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: where each sequence's new tokens start
    seq_lens: torch.Tensor  # [num_seqs] int32: context length including the new tokens
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    max_query_len: int
    max_seq_len: int
    num_decodes: int = 0  # leading sequences with one query each (ScheduledBatch.num_decodes): own launch


class Attention(nn.Module):
    """window: each query sees its last `window` positions (sliding-window layers; None: all); softcap:
    scores capped as cap * tanh(s / cap) (Gemma 2); scale: the softmax scale (default head_dim ** -0.5).
    k_scale, v_scale: what an fp8 KV cache's codes are multiplied by (the checkpoint's, else 1.0)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, rotary: RotaryEmbedding,
                 use_triton: bool, window: int | None = None, softcap: float | None = None,
                 scale: float | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale if scale is not None else head_dim**-0.5
        self.window, self.softcap = window, softcap
        self.rotary = rotary  # shared by every layer of its kind
        self.use_triton = use_triton
        self.k_scale = self.v_scale = 1.0  # an fp8 cache's; constants, so CUDA graphs may capture them

    def forward(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        # positions: [num_tokens]; q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        # q and k are not yet rotated; on CUDA q is rotated in place.
        k_cache, v_cache = kv_cache
        store = (positions, q, k, v, self.rotary.cos, self.rotary.sin, k_cache, v_cache, meta.slot_mapping)
        scales = {"k_scale": self.k_scale, "v_scale": self.v_scale} if k_cache.dtype == kv_store.FP8 else {}
        extra = {"window": self.window, "softcap": self.softcap, **scales}
        if self.use_triton:
            q = kv_store.rope_store_kv(*store, **scales)
            attend = paged_attention.paged_attention
            extra["num_decodes"] = meta.num_decodes
        else:
            q = kv_store.rope_store_kv_ref(*store, **scales)
            attend = paged_attention.paged_attention_ref
        return attend(q, k_cache, v_cache, torch.empty_like(q), meta.query_start_loc, meta.seq_lens,
                      meta.block_tables, self.scale, meta.max_query_len, meta.max_seq_len, **extra)
