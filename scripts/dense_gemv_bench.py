"""Batch-1 GEMV of 16-bit weights: cuBLAS (F.linear) beside `dense_gemv` with the configuration start-up timing
picks, on Llama-2-7B's four fused projections and its LM head (needs CUDA):

    python scripts/dense_gemv_bench.py [--dtype float16]

Cold weights (enough copies to overflow L2), CUDA graphs timed by do_bench; GB/s on the weight bytes; the
largest difference from cuBLAS relative to the output's largest value.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import triton

from llmctl.runtime.kernels import dense_gemv
from llmctl.runtime.kernels.timing import graph_ms

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008),
          "lm_head": (32000, 4096)}  # name: N, K
COLD_BYTES = 400 * 2**20


def per_call_us(fns) -> float:
    return graph_ms(lambda: [fn() for fn in fns], 10, 100) / len(fns) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    dtype = getattr(torch, parser.parse_args().dtype)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, {dtype}, M = 1")
    print(f"{'shape':>8} {'N':>6} {'K':>6} {'cuBLAS us':>10} {'GB/s':>6} {'triton us':>10} {'GB/s':>6} {'speedup':>8} "
          f"{'rel diff':>9}  chosen")
    total = [0.0, 0.0]
    for name, (n, k) in SHAPES.items():
        torch.manual_seed(0)
        w = torch.randn(n, k, device="cuda", dtype=dtype) * 0.02
        copies = [w] + [w.clone() for _ in range(max(1, COLD_BYTES // (n * k * 2)))]
        x = torch.randn(1, k, device="cuda", dtype=dtype)
        dense_gemv.pretune([w], dtype)
        cfg = dense_gemv.chosen(w) or dense_gemv.GemvConfig(32, 256, 4, 4, 1)
        want = F.linear(x, w).float()
        diff = ((dense_gemv.gemv(x, w, None, cfg).float() - want).abs().max() / want.abs().max()).item()
        cublas = per_call_us([lambda c=c, x=x: F.linear(x, c) for c in copies])
        ours = per_call_us([lambda c=c, x=x, cfg=cfg: dense_gemv.gemv(x, c, None, cfg) for c in copies])
        total[0] += cublas
        total[1] += ours if dense_gemv.chosen(w) else cublas
        gb = n * k * 2 / 1e3
        print(f"{name:>8} {n:>6} {k:>6} {cublas:>10.1f} {gb / cublas:>6.0f} {ours:>10.1f} {gb / ours:>6.0f} "
              f"{cublas / ours:>7.2f}x {diff:>9.1e}  {dense_gemv.chosen(w)}")
    print(f"one layer's four projections + the LM head once: cuBLAS {total[0]:.1f} us, with the start-up choice "
          f"{total[1]:.1f} us")


if __name__ == "__main__":
    main()
