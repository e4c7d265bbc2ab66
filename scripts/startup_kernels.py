"""Which Triton kernels a cold start-up compiles outside W4A16 (attention, the KV store, norms, activations), and
how long they take one at a time and on a pool of threads (what `compiling.ahead` does at start-up), compiled
here for sm_90 by Triton's own compiler (no GPU needed):

    python scripts/startup_kernels.py [--shape llama2-7b] [--kv-cache-dtype auto|fp8] [--threads 1 2 ...]

A one-layer random model of the shape (every layer launches the same kernels) runs, on the CPU with the Triton
backend, the forward passes a start-up runs before serving: the profiling pass (max_num_batched_tokens tokens)
and one decode step per CUDA-graph batch size. Every kernel launch is recorded instead of run (the matmuls
between them return empty tensors): the distinct (kernel, specialization) pairs are what a cold Triton cache
compiles, one after the other as each is first met before `compiling.ahead`, all at once since.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections import Counter

import torch
import torch.nn.functional as F
from sass_report import compile_seconds, distinct, launches

from llmctl.bench.random_model import write_random_model
from llmctl.runtime import LLM
from llmctl.runtime.cuda_graphs import DecodeGraphs
from llmctl.runtime.kernels import paged_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama2-7b")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--sms", type=int, default=132, help="the GPU's SM count (decode attention's split of the keys)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as model:
        write_random_model(args.shape, model, "float16", layers=1)
        llm = LLM(model, dtype="float16", kernel_backend="triton", enforce_eager=True,
                  kv_cache_dtype=args.kv_cache_dtype, kv_cache_memory=1 << 28)
    runner, config = llm.engine.model_runner, llm.engine.config
    graphs = DecodeGraphs(runner.model, runner.kv_caches, config.max_num_seqs, runner.max_blocks_per_seq,
                          config.max_model_len, runner.block_size, runner.scratch_block, runner.device)
    tokens = config.max_num_batched_tokens
    lens = [min(config.max_model_len, tokens - i) for i in range(0, tokens, config.max_model_len)]
    meta = runner._dummy_metadata(lens)
    ids = torch.zeros(tokens, dtype=torch.long)
    positions = torch.cat([torch.arange(n) for n in lens])
    paged_attention._sm_count = lambda device: args.sms
    os.environ["TRITON_INTERPRET"] = "1"  # only lets CPU tensors past the launchers' device checks: the kernels
    real_linear, passes = F.linear, 0     # were JIT-compiled when imported without it
    F.linear = lambda x, w, b=None: x.new_empty(*x.shape[:-1], w.shape[0])  # the matmuls' values are never read
    try:
        with torch.inference_mode(), launches(90, force={"USE_ASM": True}) as found:
            runner.model(ids, positions, runner.kv_caches, meta)  # the profiling pass
            passes += 1
            for size in graphs.sizes:
                graphs._forward(size)
                passes += 1
    finally:
        F.linear = real_linear
    kernels = distinct(found)
    names = sorted(f"{name} x{n}" for name, n in Counter(src.fn.__name__ for src, _ in kernels).items())
    print(f"{passes} forward passes (profiling, then {len(graphs.sizes)} decode sizes), {len(found)} launches: "
          f"{len(kernels)} distinct kernels ({', '.join(names)})")
    for threads in args.threads:
        seconds = compile_seconds(kernels, threads)
        print(f"{len(kernels)} kernels, {threads} thread(s): {seconds:.1f} s, {seconds / len(kernels):.2f} s a kernel")

if __name__ == "__main__":
    main()
