"""What a speculative verification step costs: one forward pass over 1 + K tokens per sequence, beside a plain
decode step of one token per sequence, at batch 1, 8 and 32, each sequence with --context tokens cached.

The steps are built as the engine builds them (batch_inputs.prepare over a ScheduledBatch with drafts), each
captured in a CUDA graph (the engine replays decode and verification steps so) and its replays timed with
CUDA events over --iters runs after a warm-up, so the ratio is the forward pass's alone. With a mean
accepted length L (scripts/spec_bench.py), speculation's expected speedup at a batch is
L x (plain step time / verification step time).

    python scripts/spec_step_cost.py --model DIR [--context 512] [--k 3 5 8] [--batches 1 8 32]
"""

from __future__ import annotations

import argparse
import time

import torch

from llmctl.runtime import batch_inputs
from llmctl.runtime.llm import LLM
from llmctl.runtime.sampling_params import SamplingParams
from llmctl.runtime.scheduler import ScheduledBatch
from llmctl.runtime.sequence import Sequence


def prefilled(llm: LLM, batch: int, context: int) -> list[Sequence]:
    """`batch` sequences of `context` random tokens whose KV is computed, each with one new token to decode."""
    engine = llm.engine
    seqs = []
    for i in range(batch):
        prompt = torch.randint(0, engine.vocab_size, (context,), generator=torch.Generator().manual_seed(i)).tolist()
        seqs.append(engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)))
    while any(s.num_output_tokens == 0 for s in seqs):  # prefill, then stop at the first sampled token
        engine.step()
    while engine._in_flight:
        engine._finish(engine._in_flight[0])
    return seqs


def time_step(llm: LLM, seqs: list[Sequence], k: int, iters: int) -> float:
    """Milliseconds of the forward pass (and logits) of one step: each sequence computes 1 + k tokens."""
    runner, blocks = llm.engine.model_runner, llm.engine.block_manager
    batch = ScheduledBatch()
    for seq in seqs:
        if not blocks.can_allocate(seq, 1 + k):
            raise SystemExit("the KV cache is too small for this batch and K")
        blocks.allocate(seq, 1 + k)
        batch.add(seq, 1 + k, [seq.token_ids[-1]] * k)
    ids, _, positions, meta, rows = batch_inputs.prepare(batch, None, runner.block_size, runner.scratch_block,
                                                         runner.device)

    def step() -> None:
        hidden = runner.model(ids, positions, runner.kv_caches, meta)
        runner.model.compute_logits(hidden[rows])

    for _ in range(3):
        step()
    if not torch.cuda.is_available():  # (a smoke run on a CPU)
        start = time.perf_counter()
        for _ in range(iters):
            step()
        return (time.perf_counter() - start) * 1000 / iters
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()  # as the engine runs both (decode and verification graphs): no launch gaps
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--k", type=int, nargs="+", default=[3, 5, 8])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--dtype", default="float16")
    args = parser.parse_args()
    llm = LLM(args.model, dtype=args.dtype, enforce_eager=True)
    print(f"{'batch':>6}{'K':>4}{'step ms':>10}{'vs decode':>11}")
    for batch in args.batches:
        seqs = prefilled(llm, batch, args.context)
        plain = time_step(llm, seqs, 0, args.iters)
        print(f"{batch:>6}{0:>4}{plain:>10.3f}{1.0:>10.2f}x", flush=True)
        for k in args.k:
            ms = time_step(llm, seqs, k, args.iters)
            print(f"{batch:>6}{k:>4}{ms:>10.3f}{ms / plain:>10.2f}x", flush=True)
        for seq in seqs:
            llm.engine.abort(seq.request_id)


if __name__ == "__main__":
    main()
