"""Write this step's keys and values into the paged KV cache.

Cache layout (per layer): `[num_blocks, block_size, num_kv_heads, head_dim]`, contiguous, so token
slot `s = block_id * block_size + offset` is row `s` of `cache.view(-1, num_kv_heads, head_dim)`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements one program copies per tensor: large enough to amortise the slot lookup, small enough
# to keep a whole token's heads in registers for the usual head counts.
_MAX_ELEMENTS_PER_PROGRAM = 4096


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads < NUM_KV_HEADS)[:, None] & (dims < HEAD_DIM)[None, :]
    # int64: slot * row size overflows int32 on large caches
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    cache_off = slot * (NUM_KV_HEADS * HEAD_DIM) + heads[:, None] * HEAD_DIM + dims[None, :]
    k = tl.load(key_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    v = tl.load(value_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
    tl.store(k_cache_ptr + cache_off, k, mask=mask)
    tl.store(v_cache_ptr + cache_off, v, mask=mask)


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


def store_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    # key, value: [num_tokens, num_kv_heads, head_dim]; slot_mapping: [num_tokens]
    _check_store_args(key, value, k_cache, v_cache, slot_mapping)
    if slot_mapping.stride(0) != 1:
        raise ValueError(f"slot_mapping must be contiguous, got stride {slot_mapping.stride()}")
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(num_kv_heads), max(1, _MAX_ELEMENTS_PER_PROGRAM // block_d))
    grid = (num_tokens, triton.cdiv(num_kv_heads, block_h))
    _store_kv_kernel[grid](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=4,
    )


def store_kv_ref(key, value, k_cache, v_cache, slot_mapping) -> None:
    _check_store_args(key, value, k_cache, v_cache, slot_mapping)
    _, num_kv_heads, head_dim = key.shape
    slots = slot_mapping.long()
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, key)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, value)
