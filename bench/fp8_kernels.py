"""Time FP8 (e4m3, per-channel scales) linears at decode sizes against 16-bit cuBLAS (needs CUDA).

    python -m llmctl.bench.fp8_kernels [--batches 1 2 4 ...] [--dtype bfloat16] [--sweep]

For Llama-2-7B's four projections and each M, four ways: `F.linear` on the 16-bit weight (the baseline);
`fp8_linear`'s "torch" path (quantize_rows in torch ops, then `torch._scaled_mm`), its "fused" path (the
quantization as one Triton kernel, then `torch._scaled_mm`) and its "gemv" path (the weight-only FP8 GEMV, in
the configuration start-up timing picks for the shape and rows, `fp8_gemv_tune`).
Each is first checked against the fp32 product of the dequantized weight (the GEMM paths also carry the
activations' quantization error, a few percent; the GEMV only its output's rounding).

Timing: each method runs on R copies of the weight one after the other, captured in one CUDA graph, with R
such that the FP8 copies fill over 400 MB (eight times L2: every weight is read cold, as consecutive
layers read theirs); the graph's replays are timed by `triton.testing.do_bench` (median) and divided by R:
GPU time without Python's launch cost, as the runtime's decode graphs run. GB/s is the GEMV's weight
bytes over its time. The summary gives the M up to which the GEMV beats the fused GEMM on every shape
(`fp8_linear.GEMV_MAX_ROWS`) and the decode rate the four projections alone allow at M = 1. --sweep also
times the GEMV's default configuration (`fp8_gemv.default_config`) beside the chosen one.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton

from llmctl.runtime.kernels import fp8_gemv, fp8_gemv_tune
from llmctl.runtime.kernels.timing import graph_ms
from llmctl.runtime.layers.fp8_linear import FP8, FP8_MAX, GEMV_MAX_ROWS, fp8_linear

SHAPES = {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096)}  # name: K, N
BATCHES = [1, 2, 4, 8, 16, 32, 64]
LAYERS = 32  # Llama-2-7B's
COLD_BYTES = 400 * 2**20
PATHS = ("torch", "fused", "gemv")


@dataclass
class Weights:
    """R copies of one projection: FP8 weights, their scales and the 16-bit weights they stand for."""

    fp8: list[torch.Tensor]
    scales: list[torch.Tensor]
    dense: list[torch.Tensor]


def make_weights(k: int, n: int, dtype: torch.dtype) -> Weights:
    dense = torch.randn(n, k, device="cuda") * 0.02
    scale = dense.abs().amax(1, keepdim=True) / FP8_MAX
    w = (dense / scale).to(FP8)
    copies = max(2, min(32, -(-COLD_BYTES // w.numel())))
    fp8 = [w] + [w.clone() for _ in range(copies - 1)]
    return Weights(fp8, [scale] * copies, [(c.float() * scale).to(dtype) for c in fp8])


def per_call_us(fns) -> float:
    return graph_ms(lambda: [fn() for fn in fns], 10, 100) / len(fns) * 1e3


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).abs().max() / want.abs().max()).item()


def bench_m(ws: Weights, m: int, dtype: torch.dtype) -> dict[str, float]:
    """{method: microseconds a call, method + " err": max relative error}."""
    k = ws.fp8[0].shape[1]
    x = torch.randn(m, k, device="cuda").to(dtype)
    want = x.float() @ (ws.fp8[0].float() * ws.scales[0]).T
    row = {"cublas err": rel_err(F.linear(x, ws.dense[0]), want)}
    row["cublas"] = per_call_us([lambda d=d: F.linear(x, d) for d in ws.dense])
    for path in PATHS:
        row[f"{path} err"] = rel_err(fp8_linear(x, ws.fp8[0], ws.scales[0], False, path=path), want)
        row[path] = per_call_us([lambda w=w, s=s, p=path: fp8_linear(x, w, s, False, path=p)
                                 for w, s in zip(ws.fp8, ws.scales)])
    return row


def versus_default(ws: Weights, m: int, dtype: torch.dtype) -> str:
    """The start-up choice (the gemv column) beside the configuration the shape alone gives."""
    x = torch.randn(m, ws.fp8[0].shape[1], device="cuda").to(dtype)
    n, k = ws.fp8[0].shape
    default = fp8_gemv.default_config(m, n, k, x.device)
    us = per_call_us([lambda w=w, s=s: fp8_gemv.gemv(x, w, s, cfg=default) for w, s in zip(ws.fp8, ws.scales)])
    return f"chosen {fp8_gemv_tune.chosen(m, ws.fp8[0], dtype)}; default {default}: {us:.1f} us"


def run(batches=BATCHES, dtype: torch.dtype = torch.float16, with_sweep: bool = False, print_fn=print) -> list[dict]:
    print_fn(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; {dtype} x; "
             "cold weights, CUDA graphs timed by do_bench (see --help)")
    print_fn(f"{'shape':>8} {'M':>3} {'cuBLAS':>8} {'torch':>8} {'fused':>8} {'gemv':>8}   "
             f"{'torch':>6} {'fused':>6} {'gemv':>6} {'GB/s':>6}   errors: cuBLAS torch fused gemv")
    rows = []
    for name, (k, n) in SHAPES.items():
        torch.manual_seed(0)
        ws = make_weights(k, n, dtype)
        fp8_gemv_tune.pretune([(ws.fp8[0], ws.scales[0])], dtype, min(max(batches), GEMV_MAX_ROWS))  # as at start-up
        for m in batches:
            r = bench_m(ws, m, dtype) | {"shape": name, "m": m, "k": k, "n": n}
            rows.append(r)
            gbps = n * k / (r["gemv"] * 1e-6) / 1e9
            speedups = " ".join(f"{r['cublas'] / r[p]:>5.2f}x" for p in PATHS)
            errs = " ".join(f"{r[p + ' err']:.1e}" for p in ("cublas", *PATHS))
            print_fn(f"{name:>8} {m:>3} {r['cublas']:>8.1f} {r['torch']:>8.1f} {r['fused']:>8.1f} {r['gemv']:>8.1f}   "
                     f"{speedups} {gbps:>6.0f}   {errs}")
            if with_sweep and m <= GEMV_MAX_ROWS:
                print_fn(f"{'':>12} {versus_default(ws, m, dtype)}")
        del ws
        torch.cuda.empty_cache()
    return rows


def summary(rows: list[dict]) -> list[str]:
    """The largest M up to which the GEMV wins on every shape, and M = 1's decode bound from the linears."""
    ms = sorted({r["m"] for r in rows})
    wins = [m for m in ms if all(r["gemv"] < r["fused"] for r in rows if r["m"] == m)]
    rows_max = max((m for m in ms if all(w in wins for w in ms if w <= m)), default=0)
    lines = [f"GEMV faster than fused + _scaled_mm on every shape up to M = {rows_max} "
             f"(fp8_linear.GEMV_MAX_ROWS; M where it wins: {wins})"]
    one = [r for r in rows if r["m"] == 1]
    if len(one) == len(SHAPES):
        for method in ("cublas", *PATHS):
            us = sum(r[method] for r in one) * LAYERS
            lines.append(f"M=1 decode, the {LAYERS} layers' linears alone: {method:>6} {us / 1e3:.2f} ms a token, "
                         f"at most {1e6 / us:.0f} tok/s")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    parser.add_argument("--sweep", action="store_true",
                        help="also time the GEMV's default configuration beside the start-up choice (M <= 32)")
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.fp8_kernels needs a CUDA GPU (Hopper, for torch._scaled_mm's FP8)")
    rows = run(opts.batches, getattr(torch, opts.dtype), opts.sweep)
    for line in summary(rows):
        print(line)


if __name__ == "__main__":
    main()
