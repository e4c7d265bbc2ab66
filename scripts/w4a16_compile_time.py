"""How many distinct W4A16 kernels a cold int4 start-up compiles, and how long they take one at a time and on
a pool of threads (what `dispatch.precompile` does at start-up), compiled here for sm_90 by Triton's own
compiler (no GPU needed):

    python scripts/w4a16_compile_time.py [--sample 24] [--threads 1 2 ...]

The shapes are Llama-2-7B's four fused projections at group size 128, every M bucket up to 8,192 (the
runtime's max_num_batched_tokens), every candidate `dispatch.candidates` times for fp16 x.
"""

from __future__ import annotations

import argparse
import os

import torch
from sass_report import compile_seconds, distinct, launches, random_w4

from llmctl.runtime.kernels.w4a16 import PATHS, dispatch

SHAPES = ((4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096))  # K, N: qkv, o, gate_up, down
GROUP = 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", type=int, default=24, help="kernels to compile for the timing (spread evenly)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    args = parser.parse_args()
    weights = [random_w4(k, n, GROUP) for k, n in SHAPES]
    calls = 0
    with launches(90, force={"USE_ASM": True, "DOT_FP32": False}) as found:
        for _, x, w in dispatch._buckets(weights, torch.float16, 8192):
            for cfg in dispatch.candidates(x.shape[0], w, x.dtype):
                if cfg.kind != "dense":
                    PATHS[cfg.kind](x, w, None, cfg)
                    calls += 1
    kernels = distinct(found)
    print(f"{calls} candidate launches over {len(SHAPES)} shapes' buckets: {len(kernels)} distinct kernels")
    sample = kernels[:: max(1, len(kernels) // args.sample)][: args.sample]
    for threads in args.threads:
        seconds = compile_seconds(sample, threads)
        print(f"{len(sample)} kernels, {threads} thread(s): {seconds:.1f} s, {seconds / len(sample):.2f} s a kernel; "
              f"all {len(kernels)} at that rate: {seconds / len(sample) * len(kernels):.0f} s")

if __name__ == "__main__":
    main()
