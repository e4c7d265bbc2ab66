"""bf16 W4A16 tiled path on the GPU: its PTX dequantizer against the plain-Triton one (outputs must be
bit-identical; both against the reference), then both timed beside bf16 cuBLAS at M = 16 and 64.

    source scripts/gpu.sh; python3 scripts/gpu_w4a16_bf16.py      (on the device machine)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton

from llmctl.bench.w4a16_kernels import cold_copies, per_call_ms, random_packed
from llmctl.runtime.kernels.w4a16 import Config
from llmctl.runtime.kernels.w4a16 import common as w4a16_common
from llmctl.runtime.kernels.w4a16 import tiled as w4a16_tiled
from llmctl.runtime.kernels.w4a16.pack import dequantize, linear_ref


def tiled_plain(x, w, bias, cfg):
    """The tiled kernel with Triton's own unpacking instead of the PTX."""

    def grid(m, n):
        return (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k)

    return w4a16_common.launch(w4a16_tiled._tiled_kernel, grid, x, w, bias, cfg, BLOCK_M=cfg.block_m,
                               DOT_FP32=False, USE_ASM=False, EVEN=w4a16_tiled.even(w, cfg))


def check() -> None:
    w = random_packed(4096, 1000, 128, act_order=True)
    for m in (1, 16, 37):
        x = torch.randn(m, 4096, device="cuda").bfloat16() * 3
        cfg = Config("tiled", 16 if m <= 16 else 64, 64, 128, 1, 4, 3)
        ptx, plain = w4a16_tiled.tiled(x, w, None, cfg).float(), tiled_plain(x, w, None, cfg).float()
        ref = linear_ref(x, w).float()
        print(f"M={m}: PTX vs plain max abs diff {(ptx - plain).abs().max().item()}, "
              f"vs reference {((ptx - ref).abs().max() / ref.abs().max()).item():.1e}")


def best_us(fn, x, ws, m) -> float:
    bm = 16 if m <= 16 else 64
    times = []
    for bn, split, warps in ((64, 4, 4), (128, 4, 8), (64, 2, 4), (128, 8, 8)):
        cfg = Config("tiled", bm, bn, 128, split, warps, 3)
        times.append(per_call_ms([lambda v=v, c=cfg: fn(x, v, None, c) for v in ws]) * 1e3)
    return min(times)


def main() -> None:
    torch.manual_seed(0)
    check()
    for k, n in ((4096, 4096), (4096, 14336), (11008, 4096)):
        w = random_packed(k, n, 128)
        ws = cold_copies(w)
        denses = [dequantize(v).bfloat16() for v in ws]
        for m in (16, 64):
            x = torch.randn(m, k, device="cuda").bfloat16()
            cublas = per_call_ms([lambda d=d, x=x: F.linear(x, d) for d in denses]) * 1e3
            ptx, plain = best_us(w4a16_tiled.tiled, x, ws, m), best_us(tiled_plain, x, ws, m)
            print(f"bf16 M={m} {k}x{n}: cuBLAS {cublas:.1f} us, tiled PTX {ptx:.1f} ({cublas / ptx:.2f}x), "
                  f"plain {plain:.1f} ({cublas / plain:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
