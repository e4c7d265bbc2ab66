"""Time paged attention beside torch SDPA on equivalent contiguous tensors (needs CUDA).

    python -m llmctl.bench.attention_kernels

Decode reports GB/s on the K/V bytes read, prefill causal-attention TFLOP/s. Times are medians of
`triton.testing.do_bench`, which flushes L2 before each run (a layer's K/V is cold in a real step too).
"""

from __future__ import annotations

import argparse
import contextlib
from unittest import mock

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from llmctl.runtime.kernels import paged_attention as attention_module
from llmctl.runtime.kernels.kv_store import FP8
from llmctl.runtime.kernels.paged_attention import paged_attention


def paged_inputs(num_seqs, seq_len, q_len, num_heads, num_kv_heads, head_dim, block_size, dtype, device="cuda"):
    """Random paged batch with block ids shuffled across the cache; returns paged_attention's tensor args."""
    blocks_per_seq = triton.cdiv(seq_len, block_size)
    num_blocks = num_seqs * blocks_per_seq
    block_tables = torch.randperm(num_blocks, device=device).view(num_seqs, blocks_per_seq).int()
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(num_seqs * q_len, num_heads, head_dim, dtype=dtype, device=device)
    query_start_loc = torch.arange(num_seqs + 1, dtype=torch.int32, device=device) * q_len
    seq_lens = torch.full((num_seqs,), seq_len, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, torch.empty_like(q), query_start_loc, seq_lens, block_tables


def dense_view(args, num_seqs, seq_len, q_len):
    """The same batch as contiguous SDPA tensors: q [B, Hq, q_len, D], k/v [B, Hkv, seq_len, D]."""
    q, k_cache, v_cache, _, _, _, block_tables = args
    blocks = block_tables.long()
    k = k_cache[blocks].flatten(1, 2)[:, :seq_len].transpose(1, 2).contiguous()
    v = v_cache[blocks].flatten(1, 2)[:, :seq_len].transpose(1, 2).contiguous()
    return q.view(num_seqs, q_len, *q.shape[1:]).transpose(1, 2).contiguous(), k, v


def bench(num_seqs, seq_len, q_len, num_heads, num_kv_heads, head_dim=128, block_size=16, dtype=torch.float16,
          device="cuda", fp8_cache=False):
    """(paged ms, SDPA ms, max abs difference) for one batch of equal sequences. fp8_cache: the paged cache holds
    e4m3 codes (scales 1), SDPA the same values in dtype."""
    args = paged_inputs(num_seqs, seq_len, q_len, num_heads, num_kv_heads, head_dim, block_size, dtype, device)
    if fp8_cache:
        args = (args[0], args[1].to(FP8), args[2].to(FP8), *args[3:])
    scale = head_dim**-0.5
    q, k, v = dense_view(args, num_seqs, seq_len, q_len)
    k, v = k.to(dtype), v.to(dtype)
    gqa = num_heads != num_kv_heads
    # Causal with the queries as the last q_len positions: only the from-scratch prefill case maps to is_causal.
    if q_len not in (1, seq_len):
        raise ValueError(f"bench covers decode (q_len 1) and full prefill (q_len == seq_len), got q_len={q_len}")

    def paged():
        return paged_attention(*args, scale, q_len, seq_len)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=q_len > 1, scale=scale, enable_gqa=gqa)

    diff = (paged().view(num_seqs, q_len, num_heads, head_dim).transpose(1, 2) - sdpa()).abs().max().item()
    return do_bench(paged, return_mode="median"), do_bench(sdpa, return_mode="median"), diff


def parse_config(text: str, parser: argparse.ArgumentParser) -> tuple[int, int, int]:
    try:
        block_n, warps, stages = (int(x) for x in text.split("x"))
    except ValueError:
        parser.error(f"--decode-configs takes BLOCK_NxWARPSxSTAGES such as 128x4x2, got {text!r}")
    return block_n, warps, stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, nargs="+", default=[32, 8])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128, 256])
    parser.add_argument("--prefill", type=int, nargs=2, default=[8, 1024], metavar=("SEQS", "LEN"))
    parser.add_argument("--caches", nargs="+", choices=["fp16", "fp8"], default=["fp16"],
                        help="paged cache dtypes to time (fp8: e4m3; GB/s then counts its bytes; SDPA reads fp16)")
    parser.add_argument("--decode-configs", nargs="+", default=[], metavar="NxWxS",
                        help="also time decode with these (BLOCK_N x num_warps x num_stages) in place of the "
                             "kernel's own choice, e.g. 128x4x2 256x8x2")
    opts = parser.parse_args()
    configs = [None] + [parse_config(c, parser) for c in opts.decode_configs]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, fp16, head_dim 128")
    print(f"{'case':<52}{'paged us':>10}{'sdpa us':>10}{'paged':>12}{'sdpa':>12}{'max diff':>10}")
    for kv_heads in opts.kv_heads:
        for cache in opts.caches:
            for b, config in ((b, c) for b in opts.batches for c in configs):
                fixed = mock.patch.object(attention_module, "_decode_config", lambda *_, c=config: c)
                with fixed if config else contextlib.nullcontext():
                    paged_ms, sdpa_ms, diff = bench(b, opts.context, 1, opts.heads, kv_heads,
                                                    fp8_cache=cache == "fp8")
                gbytes = 2 * b * opts.context * kv_heads * 128 * 2 / 1e9
                name = f"decode B={b} Hq={opts.heads} Hkv={kv_heads} ctx={opts.context} {cache}"
                name += f" {'x'.join(map(str, config))}" if config else ""
                paged_gb = gbytes / 2 if cache == "fp8" else gbytes
                print(f"{name:<52}{paged_ms * 1e3:>10.1f}{sdpa_ms * 1e3:>10.1f}"
                      f"{paged_gb / paged_ms * 1e3:>8.0f}GB/s{gbytes / sdpa_ms * 1e3:>8.0f}GB/s{diff:>10.1e}")
        seqs, length = opts.prefill
        paged_ms, sdpa_ms, diff = bench(seqs, length, length, opts.heads, kv_heads)
        tflop = 2 * seqs * opts.heads * length * length * 128 / 1e12  # causal: half of 4 * S^2 * D per head
        name = f"prefill {seqs}x{length} Hq={opts.heads} Hkv={kv_heads}"
        print(f"{name:<52}{paged_ms * 1e3:>10.1f}{sdpa_ms * 1e3:>10.1f}"
              f"{tflop / paged_ms * 1e3:>6.0f}TFLOP/s{tflop / sdpa_ms * 1e3:>6.0f}TFLOP/s{diff:>10.1e}")


if __name__ == "__main__":
    main()
