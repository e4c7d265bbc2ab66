"""Rotary position embedding tables (the rotate-half form HF Llama, Mistral, Qwen, Gemma and Phi-3 use) with
their scalings: linear, llama3 and longrope (Phi-3).

The rotation itself happens where keys are stored: `kernels/kv_store.py` (kernel and torch twin). LongRoPE
differs from transformers past the original context: transformers switches every position to the long
factors once a sequence grows past it (re-rotating the cache it already has), a cache cannot; here
positions before it keep the short factors and later ones take the long ones, as vLLM does.

Partial rotary (Phi-4-mini: `partial_rotary_factor` 0.75) turns only the first rotary_dim dims of each head,
pairing dim i with i + rotary_dim / 2. The kernels pair i with i + head_dim / 2, so the model permutes the
rows of q_proj and k_proj at load (`rotary_permutation`: q . k is unchanged when both are permuted alike)
and the tables hold the rotary pairs first and cos 1, sin 0 for the pairs that pass through."""

from __future__ import annotations

import math

import torch
from torch import nn


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies for a HF `rope_parameters` / `rope_scaling` dict, computed as transformers does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        is_medium = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope scaling type {rope_type!r}; supported: default, linear, llama3, longrope")


def longrope(head_dim: int, theta: float, scaling: dict, max_positions: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     int, float]:
    """(short inv_freq, long inv_freq, the position the long ones start at, the cos/sin factor), as
    transformers' `_compute_longrope_parameters` computes them."""
    original = int(scaling["original_max_position_embeddings"])
    factor = scaling.get("factor") or max_positions / original
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    shape = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    for k in ("short_factor", "long_factor"):
        if len(scaling[k]) != head_dim // 2:
            raise ValueError(f"rope {k} has {len(scaling[k])} entries; the rotary dims need {head_dim // 2}")
    short, long = (1.0 / (torch.tensor(scaling[k], dtype=torch.float32) * theta**shape)
                   for k in ("short_factor", "long_factor"))
    return short, long, original, float(attention)


def rotary_permutation(head_dim: int, rotary_dim: int) -> torch.Tensor:
    """[head_dim] original dim at each new position: the rotary halves at 0 and head_dim / 2, each followed
    by half of the dims that pass through."""
    r, p = rotary_dim // 2, (head_dim - rotary_dim) // 2
    dims = torch.arange(head_dim)
    return torch.cat([dims[:r], dims[2 * r:2 * r + p], dims[r:2 * r], dims[2 * r + p:]])


class RotaryEmbedding(nn.Module):
    """cos, sin: [max_positions, head_dim] fp32 buffers, cast per use to the activations' dtype as HF does."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None, device=None,
                 rotary_dim: int | None = None) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.theta, self.scaling = head_dim, max_positions, theta, scaling
        self.rotary_dim = rotary_dim or head_dim
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= head_dim:
            raise ValueError(f"rotary dims must be even and in (0, {head_dim}], got {self.rotary_dim}")
        self.reset(device)

    def reset(self, device=None) -> None:
        """(Re)build the tables on device: models are built on the meta device and filled later (there only
        their shapes: on meta, torch's Python reference ops would compute nothing, slowly)."""
        if device is None and torch.empty(0).is_meta:  # (any torch: get_default_device sees the context from 2.8)
            for name in ("cos", "sin"):
                self.register_buffer(name, torch.empty(self.max_positions, self.head_dim), persistent=False)
            return
        positions = torch.arange(self.max_positions, dtype=torch.float32)
        scaling, factor, dim = self.scaling or {}, 1.0, self.rotary_dim
        if scaling.get("rope_type", scaling.get("type")) == "longrope":
            short, long, start, factor = longrope(dim, self.theta, scaling, self.max_positions)
            freqs = torch.cat([torch.outer(positions[:start], short), torch.outer(positions[start:], long)])
        else:
            freqs = torch.outer(positions, rope_inv_freq(dim, self.theta, self.scaling))
        passing = (self.max_positions, (self.head_dim - dim) // 2)  # cos 1, sin 0: unscaled, unturned
        cos = torch.cat([freqs.cos() * factor, torch.ones(passing)], dim=-1)
        sin = torch.cat([freqs.sin() * factor, torch.zeros(passing)], dim=-1)
        self.register_buffer("cos", torch.cat((cos,) * 2, dim=-1).to(device), persistent=False)
        self.register_buffer("sin", torch.cat((sin,) * 2, dim=-1).to(device), persistent=False)
