"""How fast M = 1 and M = 16 could be under `llmctl bench kernels`'s timing: the cost of an empty kernel
node, and of a kernel that only reads each shape's int4 bytes (best of 40 block / program-count choices),
R weight copies in one CUDA graph as the bench times them, beside fp16 cuBLAS and the tuned int4 path.

    python scripts/w4a16_floor.py        (on a CUDA machine; on the device machine `source scripts/gpu.sh` first)
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llmctl.bench.w4a16_kernels import SHAPES, cold_copies, per_call_ms, random_packed
from llmctl.runtime.kernels.w4a16 import dispatch as w4a16_dispatch
from llmctl.runtime.kernels.w4a16.pack import dequantize


@triton.jit
def _read(p, out, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * BLOCK * ITERS
    acc = tl.zeros([BLOCK], tl.int32)
    for i in tl.static_range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(p + offs, mask=offs < n, other=0)
    tl.store(out + tl.program_id(0), tl.sum(acc))


@triton.jit
def _empty(out):
    tl.store(out + tl.program_id(0), 1)


def read_floor(nbytes: int, reps: int) -> float:
    """Fewest ms a call to read nbytes (R cold copies), over block sizes, unrolling and warps."""
    n = nbytes // 4
    bufs = [torch.randint(0, 1000, (n,), dtype=torch.int32, device="cuda") for _ in range(reps)]
    best = float("inf")
    for block in (512, 1024, 2048, 4096):
        for iters in (1, 2, 4, 8, 16):
            for warps in (4, 8):
                progs = triton.cdiv(n, block * iters)
                out = torch.empty(progs, dtype=torch.int32, device="cuda")
                launch = _read[(progs,)]
                best = min(best, per_call_ms([partial(launch, b, out, n, BLOCK=block, ITERS=iters, num_warps=warps)
                                              for b in bufs]))
    return best


def main() -> None:
    out = torch.empty(1024, dtype=torch.int32, device="cuda")
    for progs in (1, 132, 1024):
        ms = per_call_ms([partial(_empty[(progs,)], out)] * 16)
        print(f"empty kernel, {progs} programs: {ms * 1e3:.2f} us a graph node")
    for k, n in SHAPES:
        torch.manual_seed(0)
        w = random_packed(k, n)
        ws = cold_copies(w)
        denses = [dequantize(v).half() for v in ws]
        floor = read_floor(w.nbytes(), len(ws))
        line = [f"{k}x{n}: int4 {w.nbytes() / 1e6:.1f} MB read in {floor * 1e3:.1f} us ({w.nbytes() / floor / 1e6:.0f} GB/s)"]
        for m in (1, 16):
            x = torch.randn(m, k, dtype=torch.float16, device="cuda")
            w4a16_dispatch.w4a16_linear(x, w)  # tune this bucket outside the timing
            fp16 = per_call_ms([partial(F.linear, x, d) for d in denses])
            int4 = per_call_ms([partial(w4a16_dispatch.w4a16_linear, x, v) for v in ws])
            line.append(f"M={m}: fp16 {fp16 * 1e3:.1f} us, int4 {int4 * 1e3:.1f} us ({fp16 / int4:.2f}x; "
                        f"ceiling {fp16 / floor:.2f}x)")
        print(" | ".join(line), flush=True)
        del ws, denses


if __name__ == "__main__":
    main()
