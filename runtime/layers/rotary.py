"""Rotary position embedding tables (the rotate-half form HF Llama, Mistral, Qwen, Gemma and Phi-3 use) with
their scalings: linear, llama3 and longrope (Phi-3).

The rotation itself happens where keys are stored: `kernels/kv_store.py` (kernel and torch twin). LongRoPE
differs from transformers past the original context: transformers switches every position to the long
factors once a sequence grows past it (re-rotating the cache it already has), a cache cannot; here
positions before it keep the short factors and later ones take the long ones, as vLLM does."""

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
    if float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"partial_rotary_factor {scaling['partial_rotary_factor']} is not supported yet")
    original = int(scaling["original_max_position_embeddings"])
    factor = scaling.get("factor") or max_positions / original
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    shape = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    short, long = (1.0 / (torch.tensor(scaling[k], dtype=torch.float32) * theta**shape)
                   for k in ("short_factor", "long_factor"))
    return short, long, original, float(attention)


class RotaryEmbedding(nn.Module):
    """cos, sin: [max_positions, head_dim] fp32 buffers, cast per use to the activations' dtype as HF does."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None, device=None) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.theta, self.scaling = head_dim, max_positions, theta, scaling
        self.reset(device)

    def reset(self, device=None) -> None:
        """(Re)build the tables on device: models are built on the meta device and filled later."""
        positions = torch.arange(self.max_positions, dtype=torch.float32)
        scaling, factor = self.scaling or {}, 1.0
        if scaling.get("rope_type", scaling.get("type")) == "longrope":
            short, long, start, factor = longrope(self.head_dim, self.theta, scaling, self.max_positions)
            freqs = torch.cat([torch.outer(positions[:start], short), torch.outer(positions[start:], long)])
        else:
            freqs = torch.outer(positions, rope_inv_freq(self.head_dim, self.theta, self.scaling))
        emb = torch.cat((freqs,) * 2, dim=-1)
        self.register_buffer("cos", (emb.cos() * factor).to(device), persistent=False)
        self.register_buffer("sin", (emb.sin() * factor).to(device), persistent=False)
