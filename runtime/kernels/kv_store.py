"""Turn this step's queries and keys by their positions (rotary embedding), then write keys and values
into the paged KV cache.

Cache layout (per layer): `[num_blocks, block_size, num_kv_heads, head_dim]`, contiguous, so token
slot `s = block_id * block_size + offset` is row `s` of `cache.view(-1, num_kv_heads, head_dim)`.

On CUDA one kernel does it all, one program a token: q is rotated in place (attention reads it next),
k on its way into the cache, v is copied. Apart, these were three launches a layer for a few kilobytes
a token. The rotation is the rotate-half form of HF Llama, Mistral and Qwen2, rounded as transformers
rounds it (no fused multiply-add), bit for bit the torch twin (`rope_store_kv_ref`), which is the CPU path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(x_ptr, offs, cos, sin, mask, out_ptr, out_offs, HALF: tl.constexpr):
    x1 = tl.load(x_ptr + offs, mask=mask, other=0.0)
    x2 = tl.load(x_ptr + offs + HALF, mask=mask, other=0.0)
    cos, sin = cos.to(x1.dtype), sin.to(x1.dtype)
    tl.store(out_ptr + out_offs, x1 * cos - x2 * sin, mask=mask)
    tl.store(out_ptr + out_offs + HALF, x2 * cos + x1 * sin, mask=mask)


@triton.jit
def _rope_store_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_qt, stride_kt, stride_vt,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_KV: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    dims = tl.arange(0, HALF)
    # cos, sin rows hold the same frequencies twice (HF's layout): the first half is enough
    cos = tl.load(cos_ptr + pos * 2 * HALF + dims)[None, :]
    sin = tl.load(sin_ptr + pos * 2 * HALF + dims)[None, :]
    heads = tl.arange(0, BLOCK_H)[:, None]
    q_offs = token * stride_qt + heads * 2 * HALF + dims[None, :]
    _rotate(q_ptr, q_offs, cos, sin, heads < NUM_HEADS, q_ptr, q_offs, HALF)
    kv_heads = tl.arange(0, BLOCK_KV)[:, None]
    kv_ok = kv_heads < NUM_KV_HEADS
    # int64: slot * row size overflows int32 on large caches
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    cache_offs = slot * (NUM_KV_HEADS * 2 * HALF) + kv_heads * 2 * HALF + dims[None, :]
    _rotate(k_ptr, token * stride_kt + kv_heads * 2 * HALF + dims[None, :], cos, sin, kv_ok, k_cache_ptr,
            cache_offs, HALF)
    v_offs = token * stride_vt + kv_heads * 2 * HALF + dims[None, :]
    tl.store(v_cache_ptr + cache_offs, tl.load(v_ptr + v_offs, mask=kv_ok), mask=kv_ok)
    tl.store(v_cache_ptr + cache_offs + HALF, tl.load(v_ptr + v_offs + HALF, mask=kv_ok), mask=kv_ok)


def _check_store_args(key, value, k_cache, v_cache, slot_mapping) -> None:
    if key.dim() != 3 or value.shape != key.shape:
        raise ValueError(
            f"key and value must both be [num_tokens, num_kv_heads, head_dim], got "
            f"{tuple(key.shape)} and {tuple(value.shape)}"
        )
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if tuple(k_cache.shape[2:]) != tuple(key.shape[1:]):
        raise ValueError(f"cache heads/head_dim {tuple(k_cache.shape[2:])} != key's {tuple(key.shape[1:])}")
    if slot_mapping.shape != (key.shape[0],):
        raise ValueError(f"slot_mapping must be [{key.shape[0]}], got {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    dtypes = {key.dtype, value.dtype, k_cache.dtype, v_cache.dtype}
    if len(dtypes) != 1:
        raise ValueError(f"key, value, k_cache and v_cache must share one dtype, got {sorted(map(str, dtypes))}")
    devices = {t.device for t in (key, value, k_cache, v_cache, slot_mapping)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError(f"key/value head_dim must be contiguous, got strides {key.stride()} and {value.stride()}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")


def _check_rope_args(positions, q, key, cos, sin) -> None:
    if q.dim() != 3 or q.shape[0] != key.shape[0] or q.shape[2] != key.shape[2] or q.shape[1] % key.shape[1]:
        raise ValueError(f"q must be [num_tokens, num_heads, head_dim] beside key {tuple(key.shape)}, "
                         f"got {tuple(q.shape)}")
    head_dim = q.shape[2]
    if head_dim % 2 or cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != head_dim:
        raise ValueError(f"cos and sin must be [max_positions, {head_dim}] tables for an even head_dim, got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    if positions.shape != (q.shape[0],):
        raise ValueError(f"positions must be [{q.shape[0]}], got {tuple(positions.shape)}")
    if not (cos.is_floating_point() and cos.is_contiguous() and sin.dtype == cos.dtype and sin.is_contiguous()):
        raise ValueError(f"cos and sin must be contiguous float tables of one dtype, got {cos.dtype} and {sin.dtype}")
    devices = {t.device for t in (positions, q, key, cos, sin)}
    if len(devices) != 1:
        raise ValueError(f"positions, q, key, cos and sin must be on one device, got {sorted(map(str, devices))}")


def rope_store_kv(positions, q, key, value, cos, sin, k_cache, v_cache, slot_mapping) -> torch.Tensor:
    """Rotate q in place and key into the cache, copy value into it; returns q.

    q: [num_tokens, num_heads, head_dim], key, value: [num_tokens, num_kv_heads, head_dim] (views into a
    fused projection are fine: heads packed, any token stride); positions, slot_mapping: [num_tokens];
    cos, sin: [max_positions, head_dim] fp32. key itself is left as it was."""
    _check_store_args(key, value, k_cache, v_cache, slot_mapping)
    _check_rope_args(positions, q, key, cos, sin)
    num_tokens, num_heads, head_dim = q.shape
    if head_dim & (head_dim - 1):
        raise ValueError(f"the Triton path needs head_dim a power of two, got {head_dim}")
    if any(t.stride(1) != head_dim for t in (q, key, value)) or q.stride(2) != 1:
        raise ValueError(f"q, key and value must have packed heads, got strides {q.stride()}, {key.stride()}, "
                         f"{value.stride()}")
    if slot_mapping.stride(0) != 1 or positions.stride(0) != 1:
        raise ValueError("slot_mapping and positions must be contiguous")
    if num_tokens:
        num_kv_heads = key.shape[1]
        _rope_store_kernel[(num_tokens,)](
            q, key, value, positions, cos, sin, k_cache, v_cache, slot_mapping,
            q.stride(0), key.stride(0), value.stride(0),
            NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HALF=head_dim // 2,
            BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_KV=triton.next_power_of_2(num_kv_heads), num_warps=4,
            enable_fp_fusion=False,  # no FMA: each product and sum rounded on its own, as in transformers
        )
    return q


def rope_ref(positions, x, cos, sin):
    """x: [num_tokens, heads, head_dim] turned by its positions, as transformers does (a new tensor)."""
    c = cos[positions].to(x.dtype).unsqueeze(1)
    s = sin[positions].to(x.dtype).unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * c + torch.cat((-x2, x1), dim=-1) * s


def rope_store_kv_ref(positions, q, key, value, cos, sin, k_cache, v_cache, slot_mapping) -> torch.Tensor:
    """Torch twin of `rope_store_kv`; returns the rotated q (a new tensor; any head_dim)."""
    _check_store_args(key, value, k_cache, v_cache, slot_mapping)
    _check_rope_args(positions, q, key, cos, sin)
    _, num_kv_heads, head_dim = key.shape
    slots = slot_mapping.long()
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, rope_ref(positions, key, cos, sin))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, value)
    return rope_ref(positions, q, cos, sin)
