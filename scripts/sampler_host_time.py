"""Host time a decode step spends turning penalized rows' tokens into the sampler's index (CPU only).

    python scripts/sampler_host_time.py [--rows 256] [--tokens 1200]

Times the same step twice: from the sequences' Python token lists (the old way) and from their
incrementally kept int64 arrays (`Sequence.token_array`, what the model runner passes now).
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from llmctl.runtime.layers import sampler
from llmctl.runtime.sampling_params import SamplingParams
from llmctl.runtime.sequence import Sequence

VOCAB = 32000


def index_ms(prompts, outputs, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        p, o = prompts(), outputs()
        sampler._flat_token_index(list(zip(p, o)), VOCAB, torch.device("cpu"), "prompt/output")
        sampler._flat_token_index([(out,) for out in o], VOCAB, torch.device("cpu"), "output")
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=1200, help="prompt + output tokens a row (half each)")
    args = parser.parse_args()
    random.seed(0)
    params = SamplingParams(temperature=0.8, repetition_penalty=1.1, frequency_penalty=0.2)
    seqs = []
    for i in range(args.rows):
        seq = Sequence(str(i), [random.randrange(VOCAB) for _ in range(args.tokens // 2)], params)
        for _ in range(args.tokens - args.tokens // 2):
            seq.append_token(random.randrange(VOCAB))
        seq.token_array()
        seqs.append(seq)
    lists = index_ms(lambda: [s.prompt_token_ids for s in seqs], lambda: [s.output_token_ids for s in seqs])
    arrays = index_ms(lambda: [s.token_array()[: s.num_prompt_tokens] for s in seqs],
                      lambda: [s.token_array()[s.num_prompt_tokens:] for s in seqs])
    print(f"{args.rows} rows x {args.tokens} tokens with penalties: from lists {lists:.1f} ms, "
          f"from token arrays {arrays:.1f} ms a step")


if __name__ == "__main__":
    main()
