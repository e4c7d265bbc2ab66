"""Where a decode step's time goes on the GPU: wall time per step against summed kernel time, by kernel.

    python scripts/profile_decode.py --model DIR [--batch 256] [--context 800] [--kv-cache-dtype fp8]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from llmctl.bench.offline import Workload
from llmctl.runtime import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--context", type=int, default=800)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    args = parser.parse_args()
    llm = LLM(args.model, dtype="float16", kv_cache_dtype=args.kv_cache_dtype)
    engine = llm.engine
    print("kv cache tokens", engine.block_manager.num_blocks * engine.config.block_size, "in", args.kv_cache_dtype)
    work = Workload.uniform(args.batch, args.context, args.context, engine.vocab_size, seed=3)
    for prompt in work.prompts:
        engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=1000, ignore_eos=True))
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for _ in range(5):
        engine.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / args.steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        torch.cuda.synchronize()
    kernels: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name[:70]] += event.time_range.elapsed_us() / args.steps
    gpu = sum(kernels.values()) / 1000
    print(f"batch {args.batch} context ~{args.context}: wall {wall * 1000:.2f} ms/step, kernels {gpu:.2f} ms/step, "
          f"gap {wall * 1000 - gpu:.2f} ms; {args.batch / wall:.0f} tok/s")
    for name, us in sorted(kernels.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {us / 1000:8.3f} ms  {name}")


if __name__ == "__main__":
    main()
