"""Where the offline workload's time goes, step by step, on the GPU's own clock.

CUDA events around every step's queued work give each step's GPU span (from its first queued work to its
sampler) and the idle time between steps (the GPU waiting for the host). Steps are grouped as prefill
(some prompt tokens) or decode by batch size; for each group: steps, GPU ms, idle ms, tokens, context
tokens read by decode attention. One call: `python scripts/offline_trace.py --model DIR [--kv-cache-dtype
fp8]` (the workload of `python -m llmctl.bench.offline`, same seed).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from llmctl.bench.offline import Workload
from llmctl.runtime import LLM, SamplingParams


def group(num_tokens: int, batch: int) -> str:
    if num_tokens > batch:
        return "prefill+decode"
    for hi in (8, 32, 64, 128, 192, 256):
        if batch <= hi:
            return f"decode <= {hi}"
    return "decode > 256"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    args = parser.parse_args()
    llm = LLM(args.model, dtype="float16", kv_cache_dtype=args.kv_cache_dtype)
    engine = llm.engine
    vocab = engine.vocab_size
    warm = Workload.uniform(8, 16, 64, vocab, seed=2)
    llm.generate(warm.prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    work = Workload.uniform(args.requests, 100, 1024, vocab)
    steps = []  # (start event, end event, group, tokens, context)
    run = engine.model_runner.run

    def traced(batch, *pending, **options):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = run(batch, *pending, **options)
        end.record()
        context = sum(s.num_computed_tokens + n for s, n in zip(batch.seqs, batch.num_new_tokens))
        steps.append((start, end, group(batch.num_tokens, len(batch)), batch.num_tokens, context))
        return out

    engine.model_runner.run = traced
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in work.output_lens]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    llm.generate(work.prompts, params)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    rows: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0, 0, 0])
    previous_end = None
    for start, end, name, tokens, context in steps:
        row = rows[name]
        row[0] += 1
        row[1] += start.elapsed_time(end)
        if previous_end is not None:
            row[2] += previous_end.elapsed_time(start)
        row[3] += tokens
        row[4] += context
        previous_end = end
    out_tokens = sum(work.output_lens)
    print(f"wall {wall:.2f} s, {out_tokens / wall:.0f} out tok/s, {len(steps)} steps")
    print(f"{'group':>16} {'steps':>6} {'gpu s':>7} {'idle s':>7} {'ms/step':>8} {'tokens':>8} {'ctx Mtok':>9} {'KV TB/s*':>8}")
    kv_bytes = engine.model_runner._block_bytes() // engine.model_runner.block_size  # K and V of a token, all layers
    for name in sorted(rows, key=lambda n: (n[0] != "p", int(n.split()[-1]) if n[-1].isdigit() else 0)):
        n, gpu, idle, tokens, context = rows[name]
        print(f"{name:>16} {n:>6} {gpu / 1e3:>7.2f} {idle / 1e3:>7.2f} {gpu / n:>8.2f} {tokens:>8} "
              f"{context / 1e6:>9.2f} {context * kv_bytes / (gpu / 1e3) / 1e12:>8.2f}")
    print("* context KV bytes over the whole step's GPU time (weights and other kernels included)")


if __name__ == "__main__":
    main()
