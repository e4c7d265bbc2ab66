"""Turn this step's queries and keys by their positions (rotary embedding), then write keys and values
into the paged KV cache.

Cache layout (per layer): `[num_blocks, block_size, num_kv_heads, head_dim]`, contiguous, so token
slot `s = block_id * block_size + offset` is row `s` of `cache.view(-1, num_kv_heads, head_dim)`.

On CUDA one kernel does it all, one program a token: q is rotated in place (attention reads it next),
k on its way into the cache, v is copied. Apart, these were three launches a layer for a few kilobytes
a token. The rotation is the rotate-half form of HF Llama, Mistral and Qwen2, rounded as transformers
rounds it (no fused multiply-add), bit for bit the torch twin (`rope_store_kv_ref`), which is the CPU path.

An fp8 cache (float8_e4m3fn, `--kv-cache-dtype fp8`) stores round(k / k_scale) and round(v / v_scale) with
one scale per layer: the rotated key (in the model's dtype, rounded as above) times 1 / scale in fp32,
clamped to e4m3's +-448, rounded to nearest even. The rounding is done in arithmetic onto e4m3's grid
(`_round_e4m3`) so that every backend, Triton's interpreter included (its fp8 cast drops the exponent
carry of a value that rounds up to the next power of two), stores the bits torch's cast stores.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from llmctl.runtime.kernels.compiling import start

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3fn's largest finite value
_FP8_MAX_C: tl.constexpr = tl.constexpr(FP8_MAX)
_RINT: tl.constexpr = tl.constexpr(12582912.0)  # 1.5 * 2^23: + and - it rounds an fp32 below 2^22 to an integer


@triton.jit
def _round_e4m3(x):
    """x fp32 (already divided by the scale) -> the nearest e4m3fn value, still fp32 (exact in fp8)."""
    x = tl.minimum(tl.maximum(x, -_FP8_MAX_C), _FP8_MAX_C)
    bits = x.to(tl.int32, bitcast=True)
    exp = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)  # below 2^-6 (subnormals) the grid's step stays 2^-9
    step = ((exp - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits: 2^(exp - 3)
    inv_step = ((127 - exp + 3) << 23).to(tl.float32, bitcast=True)
    rounded = (((x * inv_step + _RINT) - _RINT) * step).to(tl.int32, bitcast=True)
    return ((rounded & 0x7FFFFFFF) | (bits & -0x80000000)).to(tl.float32, bitcast=True)  # x's sign, zeros too


@triton.jit
def _store(ptr, offs, x, mask, inv_scale, FP8_CACHE: tl.constexpr):
    if FP8_CACHE:
        tl.store(ptr + offs, _round_e4m3(x.to(tl.float32) * inv_scale).to(ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptr + offs, x, mask=mask)


@triton.jit
def _rotate(x_ptr, offs, cos, sin, mask, out_ptr, out_offs, inv_scale, HALF: tl.constexpr, FP8_CACHE: tl.constexpr):
    x1 = tl.load(x_ptr + offs, mask=mask, other=0.0)
    x2 = tl.load(x_ptr + offs + HALF, mask=mask, other=0.0)
    cos, sin = cos.to(x1.dtype), sin.to(x1.dtype)
    _store(out_ptr, out_offs, x1 * cos - x2 * sin, mask, inv_scale, FP8_CACHE)
    _store(out_ptr, out_offs + HALF, x2 * cos + x1 * sin, mask, inv_scale, FP8_CACHE)


@triton.jit
def _rope_store_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_qt, stride_kt, stride_vt, k_inv_scale, v_inv_scale,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_KV: tl.constexpr, FP8_CACHE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    dims = tl.arange(0, HALF)
    # cos, sin rows hold the same frequencies twice (HF's layout): the first half is enough
    cos = tl.load(cos_ptr + pos * 2 * HALF + dims)[None, :]
    sin = tl.load(sin_ptr + pos * 2 * HALF + dims)[None, :]
    heads = tl.arange(0, BLOCK_H)[:, None]
    q_offs = token * stride_qt + heads * 2 * HALF + dims[None, :]
    _rotate(q_ptr, q_offs, cos, sin, heads < NUM_HEADS, q_ptr, q_offs, 1.0, HALF, False)
    kv_heads = tl.arange(0, BLOCK_KV)[:, None]
    kv_ok = kv_heads < NUM_KV_HEADS
    # int64: slot * row size overflows int32 on large caches
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    cache_offs = slot * (NUM_KV_HEADS * 2 * HALF) + kv_heads * 2 * HALF + dims[None, :]
    _rotate(k_ptr, token * stride_kt + kv_heads * 2 * HALF + dims[None, :], cos, sin, kv_ok, k_cache_ptr,
            cache_offs, k_inv_scale, HALF, FP8_CACHE)
    v_offs = token * stride_vt + kv_heads * 2 * HALF + dims[None, :]
    _store(v_cache_ptr, cache_offs, tl.load(v_ptr + v_offs, mask=kv_ok), kv_ok, v_inv_scale, FP8_CACHE)
    _store(v_cache_ptr, cache_offs + HALF, tl.load(v_ptr + v_offs + HALF, mask=kv_ok), kv_ok, v_inv_scale, FP8_CACHE)


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
    if key.dtype != value.dtype or k_cache.dtype != v_cache.dtype or k_cache.dtype not in (key.dtype, FP8):
        raise ValueError(f"key and value must share one dtype and the caches either that dtype or {FP8}, got "
                         f"{key.dtype}, {value.dtype}, {k_cache.dtype} and {v_cache.dtype}")
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


def check_scales(k_cache, k_scale: float, v_scale: float) -> None:
    """An fp8 cache's scales (the store's and the attention's): positive, finite, and 1.0 for any other cache."""
    if k_cache.dtype != FP8 and (k_scale, v_scale) != (1.0, 1.0):
        raise ValueError(f"k_scale and v_scale apply to an fp8 cache only, got {k_scale} and {v_scale}")
    if not (k_scale > 0 and v_scale > 0 and math.isfinite(k_scale) and math.isfinite(v_scale)):
        raise ValueError(f"k_scale and v_scale must be positive and finite, got {k_scale} and {v_scale}")


@functools.lru_cache(maxsize=1024)
def _fp32_reciprocals(k_scale: float, v_scale: float) -> tuple[float, float]:
    """1 / scale as fp32 computes it (both paths multiply by it), once per layer's scales, not per step."""
    inv = torch.tensor([k_scale, v_scale], dtype=torch.float32).reciprocal().tolist()
    return inv[0], inv[1]


def _inverse_scales(k_cache, k_scale: float, v_scale: float) -> tuple[float, float]:
    check_scales(k_cache, k_scale, v_scale)
    return _fp32_reciprocals(k_scale, v_scale) if k_cache.dtype == FP8 else (1.0, 1.0)


def rope_store_kv(positions, q, key, value, cos, sin, k_cache, v_cache, slot_mapping, k_scale: float = 1.0,
                  v_scale: float = 1.0) -> torch.Tensor:
    """Rotate q in place and key into the cache, copy value into it; returns q.

    q: [num_tokens, num_heads, head_dim], key, value: [num_tokens, num_kv_heads, head_dim] (views into a
    fused projection are fine: heads packed, any token stride); positions, slot_mapping: [num_tokens];
    cos, sin: [max_positions, head_dim] fp32; k_scale, v_scale: an fp8 cache's scales (it holds x / scale).
    key itself is left as it was."""
    _check_store_args(key, value, k_cache, v_cache, slot_mapping)
    k_inv, v_inv = _inverse_scales(k_cache, k_scale, v_scale)
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
        start(
            _rope_store_kernel, (num_tokens,),
            q, key, value, positions, cos, sin, k_cache, v_cache, slot_mapping,
            q.stride(0), key.stride(0), value.stride(0), k_inv, v_inv,
            NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HALF=head_dim // 2,
            BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_KV=triton.next_power_of_2(num_kv_heads),
            FP8_CACHE=k_cache.dtype == FP8, num_warps=4,
            enable_fp_fusion=False,  # no FMA: each product and sum rounded on its own, as in transformers
        )
    return q


def rope_ref(positions, x, cos, sin):
    """x: [num_tokens, heads, head_dim] turned by its positions, as transformers does (a new tensor)."""
    c = cos[positions].to(x.dtype).unsqueeze(1)
    s = sin[positions].to(x.dtype).unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * c + torch.cat((-x2, x1), dim=-1) * s


def to_cache(x: torch.Tensor, cache_dtype: torch.dtype, inv_scale: float) -> torch.Tensor:
    """x as the cache stores it: itself, or for an fp8 cache x * (1 / scale) in fp32, clamped, rounded."""
    if cache_dtype != FP8:
        return x
    return (x.float() * inv_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def rope_store_kv_ref(positions, q, key, value, cos, sin, k_cache, v_cache, slot_mapping, k_scale: float = 1.0,
                      v_scale: float = 1.0) -> torch.Tensor:
    """Torch twin of `rope_store_kv`; returns the rotated q (a new tensor; any head_dim)."""
    _check_store_args(key, value, k_cache, v_cache, slot_mapping)
    _check_rope_args(positions, q, key, cos, sin)
    k_inv, v_inv = _inverse_scales(k_cache, k_scale, v_scale)
    _, num_kv_heads, head_dim = key.shape
    slots = slot_mapping.long()
    k = to_cache(rope_ref(positions, key, cos, sin), k_cache.dtype, k_inv)
    v = to_cache(value, v_cache.dtype, v_inv)
    # (fp8 tensors have no index_copy_ on every device: the bytes are copied)
    raw = (lambda t: t.view(torch.uint8)) if k_cache.dtype == FP8 else (lambda t: t)
    raw(k_cache).view(-1, num_kv_heads, head_dim).index_copy_(0, slots, raw(k))
    raw(v_cache).view(-1, num_kv_heads, head_dim).index_copy_(0, slots, raw(v.contiguous()))
    return rope_ref(positions, q, cos, sin)
