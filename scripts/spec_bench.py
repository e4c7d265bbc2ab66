"""Speculative decoding on the reference model: mean accepted length and single-stream speed, beside none.

For each workload (code edits, held-out continuations; `llmctl.reference.prompts`) and each setting (no
speculation, ngram with K = 3, 5, 8), every prompt is decoded alone, greedily, to --max-tokens (stopping at
"\n\n\n" for code edits); the table gives output tokens per second of wall time over all prompts, the mean
accepted length (tokens a speculating step emits) and whether every output equals the unspeculated one
(else how many do, and the first token where one differs). Each workload is decoded --repeats times and the
median pass counts; the engine's steps are timed too: how many launched a speculating batch and how many a
plain one, and their mean wall time (a step's host work plus its wait for the GPU).

    python scripts/spec_bench.py [--device cpu|cuda] [--prompts 16] [--max-tokens 96] [--repeats 3] [--k 3 5 8]
                                 [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import pstats
import statistics
import time
from collections import defaultdict

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


class StepClock:
    """Wall time of each engine step, by whether it launched a speculating batch (while in a with block)."""

    def __init__(self, llm: LLM) -> None:
        self.times: dict[str, list[float]] = defaultdict(list)
        self.engine, self.runner = engine, runner = llm.engine, llm.engine.model_runner
        step, run = engine.step, runner.run
        kind = ["idle"]

        def timed_run(batch, *args, **kwargs):
            kind[0] = "spec" if batch.speculative else "plain"
            return run(batch, *args, **kwargs)

        def timed_step():
            kind[0], start = "idle", time.perf_counter()
            out = step()
            self.times[kind[0]].append(time.perf_counter() - start)
            return out

        self.wrappers = timed_step, timed_run

    def __enter__(self) -> StepClock:
        self.engine.step, self.runner.run = self.wrappers
        return self

    def __exit__(self, *exc) -> None:
        del self.engine.step, self.runner.run  # back to the classes' methods

    def summary(self) -> str:
        return ", ".join(f"{k} {len(v)} x {1e3 * sum(v) / len(v):.2f} ms" for k, v in sorted(self.times.items()) if v)


def first_difference(outputs: list[list[int]], base: list[list[int]]) -> str:
    same = sum(a == b for a, b in zip(outputs, base))
    if same == len(base):
        return "yes"
    at = min(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
             for a, b in zip(outputs, base) if a != b)
    return f"{same}/{len(base)} @{at}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3, help="passes over each workload; the median counts")
    parser.add_argument("--k", type=int, nargs="+", default=[3, 5, 8], help="the speculative token counts to run")
    parser.add_argument("--profile", action="store_true",
                        help="also print where the host's time goes (cProfile) in each setting's code edits")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    model = str(default_model_path())
    workloads = {"code edit": (code_edit_prompts(args.prompts), ["\n\n\n"]),
                 "continuation": (continuation_prompts(args.prompts), [])}
    settings = (None, *args.k)
    # Every setting's engine at once, and their passes interleaved (the order turning each round), so that a
    # drift of the host's speed during the run falls on all settings alike: run one after the other, a
    # setting's step times moved by up to 1.7x (H100, 2026-12-05). The KV cache is sized, not profiled.
    memory = {"kv_cache_memory": 256 << 20} if args.device == "cuda" else {}
    llms = {k: LLM(model, device=args.device, speculative={"method": "ngram", "num_tokens": k} if k else None,
                   **memory) for k in settings}
    state = {}
    for k, llm in llms.items():
        llm.generate(["def f(x):\n    return x\n"] * 2, SamplingParams(max_tokens=8))  # warm-up
        for name, (prompts, stop) in workloads.items():
            params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, stop=stop)
            decode_alone(llm, prompts[:2], params)  # this workload's first graphs and lookups, untimed
            state[k, name] = {"params": params, "passes": [], "clock": StepClock(llm), "drafts": 0, "accepted": 0,
                              "profiler": cProfile.Profile() if args.profile and name == "code edit" else None}
    for rep in range(args.repeats):
        turn = settings[rep % len(settings):] + settings[: rep % len(settings)]
        for name, (prompts, _) in workloads.items():
            for k in turn:
                run, s = state[k, name], llms[k].engine.speculator
                before = (s.num_drafts, s.num_accepted_tokens) if s else (0, 0)
                with run["clock"], run["profiler"] or contextlib.nullcontext():
                    run["passes"].append(decode_alone(llms[k], prompts, run["params"]))
                if s:
                    run["drafts"] += s.num_drafts - before[0]
                    run["accepted"] += s.num_accepted_tokens - before[1]
    rows = []
    for (k, name), run in state.items():
        if run["profiler"]:
            print(f"== host time, code edits, speculative {k or 'none'}, {args.repeats} passes")
            pstats.Stats(run["profiler"]).sort_stats("tottime").print_stats(14)
        passes = run["passes"]
        outputs, tokens = passes[0][0], passes[0][2]
        seconds = statistics.median(p[1] for p in passes)
        drafts, accepted = run["drafts"], run["accepted"]
        rows.append({"workload": name, "speculative": f"ngram K={k}" if k else "none", "tokens": tokens,
                     "seconds": round(seconds, 3), "tokens_per_second": round(tokens / seconds, 1),
                     "mean_accepted_length": round(1 + accepted / drafts, 3) if drafts else None,
                     "steps": run["clock"].summary(), "outputs": outputs})
    base = {r["workload"]: r for r in rows if r["speculative"] == "none"}
    print(f"device: {args.device}; {args.prompts} prompts per workload, up to {args.max_tokens} tokens, one at a time")
    print(f"{'workload':<14}{'speculative':<14}{'tok/s':>9}{'speedup':>9}{'accepted len':>14}{'identical':>12}  steps")
    for r in rows:
        b = base[r["workload"]]
        same = first_difference(r["outputs"], b["outputs"])
        accepted = f"{r['mean_accepted_length']:.2f}" if r["mean_accepted_length"] else "-"
        print(f"{r['workload']:<14}{r['speculative']:<14}{r['tokens_per_second']:>9.1f}"
              f"{r['tokens_per_second'] / b['tokens_per_second']:>8.2f}x{accepted:>14}{same:>12}  {r['steps']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: v for k, v in r.items() if k != "outputs"} for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
