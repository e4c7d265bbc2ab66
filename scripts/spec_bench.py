"""Speculative decoding on the reference model: mean accepted length and single-stream speed, beside none.

For each workload (code edits, held-out continuations; `llmctl.reference.prompts`) and each setting (no
speculation, ngram with K = 3, 5, 8), every prompt is decoded alone, greedily, to --max-tokens (stopping at
"\n\n\n" for code edits); the table gives output tokens per second of wall time over all prompts, the mean
accepted length (tokens a speculating step emits) and whether every output equals the unspeculated one.

    python scripts/spec_bench.py [--device cpu|cuda] [--prompts 16] [--max-tokens 96]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from llmctl.reference import default_model_path
from llmctl.reference.prompts import code_edit_prompts, continuation_prompts
from llmctl.runtime.llm import LLM
from llmctl.runtime.sampling_params import SamplingParams


def decode_alone(llm: LLM, prompts: list[str], params: SamplingParams) -> tuple[list[list[int]], float, int]:
    outputs, tokens, start = [], 0, time.perf_counter()
    for prompt in prompts:
        out = llm.generate([prompt], params)[0].outputs[0]
        outputs.append(out.token_ids)
        tokens += len(out.token_ids)
    return outputs, time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    model = str(default_model_path())
    workloads = {"code edit": (code_edit_prompts(args.prompts), ["\n\n\n"]),
                 "continuation": (continuation_prompts(args.prompts), [])}
    rows = []
    for k in (None, 3, 5, 8):
        spec = {"method": "ngram", "num_tokens": k} if k else None
        llm = LLM(model, device=args.device, speculative=spec)
        llm.generate(["def f(x):\n    return x\n"] * 2, SamplingParams(max_tokens=8))  # warm-up
        for name, (prompts, stop) in workloads.items():
            params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, stop=stop)
            before = (llm.engine.speculator.num_drafts, llm.engine.speculator.num_accepted_tokens) if spec else (0, 0)
            outputs, seconds, tokens = decode_alone(llm, prompts, params)
            s = llm.engine.speculator
            drafts, accepted = (s.num_drafts - before[0], s.num_accepted_tokens - before[1]) if spec else (0, 0)
            rows.append({"workload": name, "speculative": f"ngram K={k}" if k else "none", "tokens": tokens,
                         "seconds": round(seconds, 3), "tokens_per_second": round(tokens / seconds, 1),
                         "mean_accepted_length": round(1 + accepted / drafts, 3) if drafts else None,
                         "outputs": outputs})
    base = {r["workload"]: r for r in rows if r["speculative"] == "none"}
    print(f"device: {args.device}; {args.prompts} prompts per workload, up to {args.max_tokens} tokens, one at a time")
    print(f"{'workload':<14}{'speculative':<14}{'tok/s':>9}{'speedup':>9}{'accepted len':>14}{'identical':>11}")
    for r in rows:
        b = base[r["workload"]]
        same = r["outputs"] == b["outputs"]
        accepted = f"{r['mean_accepted_length']:.2f}" if r["mean_accepted_length"] else "-"
        print(f"{r['workload']:<14}{r['speculative']:<14}{r['tokens_per_second']:>9.1f}"
              f"{r['tokens_per_second'] / b['tokens_per_second']:>8.2f}x{accepted:>14}{str(same):>11}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: v for k, v in r.items() if k != "outputs"} for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
