"""Does a started engine still compile Triton kernels mid-run? (A compile stalls every request for 1-2 s.)

Starts the engine on MODEL, then runs generates whose batches bring sequence counts and prompt lengths
the start-up never ran (one sequence, sixteen, odd lengths from 3 to 3,000 tokens), and prints after each
how many new kernel variants Triton compiled, per kernel. Expect 0 after start-up.

    python scripts/midrun_compiles.py MODEL_DIR      # on a GPU; TRITON_CACHE_DIR=<empty dir> for a cold start
"""

from __future__ import annotations

import importlib
import sys
import time
from collections import Counter

KERNEL_MODULES = ("paged_attention", "kv_store", "fused", "w4a16_common", "w4a16_gemv", "w4a16_gemv_h2", "w4a16_tiled")
BATCHES = {  # prompt lengths of each generate
    "A": [37, 101, 555, 1000, 777, 333, 29, 1999],
    "A again": [37, 101, 555, 1000, 777, 333, 29, 1999],
    "B": [45, 203, 611, 1234, 93, 17, 444, 3000],
    "C": [5, 1500, 2500, 71],
    "D": [100],
    "E": [33] * 16,
    "F": [250, 700, 91],
    "G": [3],
    "H": [1000],
    "I": [17, 300],
    # more than a step's 8,192 tokens: later chunks run beside the first prompts' decodes (a mixed step)
    "J": [3000, 3000, 3000, 500],
    "K": [1500] * 6 + [20] * 3,
}


def compiled_variants() -> Counter:
    from triton.runtime.jit import JITFunction

    from llmctl.runtime.kernels import compiled_variants as variants

    counts: Counter = Counter()
    for name in KERNEL_MODULES:
        module = importlib.import_module(f"llmctl.runtime.kernels.{name}")
        for attr, obj in vars(module).items():
            if isinstance(obj, JITFunction):
                counts[f"{name}.{attr}"] += variants(obj) or 0
    return counts


def main() -> None:
    import torch

    from llmctl.runtime import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(sys.argv[1])
    print(f"start-up {time.perf_counter() - start:.1f} s", flush=True)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    before = compiled_variants()
    print(f"after start-up: {sum(before.values())} kernel variants compiled", flush=True)
    gen = torch.Generator().manual_seed(0)
    vocab = llm.engine.vocab_size
    longest = llm.engine.config.max_model_len - params.max_tokens  # short models get their prompts cut
    for label, lens in BATCHES.items():
        prompts = [torch.randint(3, vocab, (min(n, longest),), generator=gen).tolist() for n in lens]
        start = time.perf_counter()
        llm.generate(prompts, params)
        seconds = time.perf_counter() - start
        now = compiled_variants()
        new = {k: now[k] - before[k] for k in now if now[k] != before[k]}
        print(f"generate {label} ({len(lens)} prompts): {seconds:.2f} s, new variants: {sum(new.values())} {new}",
              flush=True)
        before = now


if __name__ == "__main__":
    main()
