"""Offline engine benchmarks (no HTTP): throughput and single-stream decode, beside transformers `generate`.

`python -m llmctl.bench.offline --model DIR` runs the runtime-core issue's workload: N requests with prompt
and output lengths uniform in [lo, hi], random token ids, ignore_eos, so every request makes exactly its
output length. Prints one JSON line per measurement and a table last.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @classmethod
    def uniform(cls, n: int, lo: int, hi: int, vocab_size: int, seed: int = 0) -> Workload:
        rng = random.Random(seed)
        prompts = [[rng.randrange(vocab_size) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
        return cls(prompts, [rng.randint(lo, hi) for _ in range(n)])


@dataclass
class Result:
    name: str
    requests: int
    seconds: float
    prompt_tokens: int
    output_tokens: int

    @property
    def output_tps(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def total_tps(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.seconds


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_llmctl(llm, work: Workload, name: str = "llmctl") -> Result:
    from llmctl.runtime import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in work.output_lens]
    sync()
    start = time.perf_counter()
    results = llm.generate(work.prompts, params)
    sync()
    seconds = time.perf_counter() - start
    made = sum(len(r.outputs[0].token_ids) for r in results)
    if made != sum(work.output_lens):
        raise RuntimeError(f"expected {sum(work.output_lens)} output tokens, got {made}")
    return Result(name, len(work.prompts), seconds, sum(map(len, work.prompts)), made)


def run_transformers(model, work: Workload, batch_size: int) -> Result:
    """transformers `generate` in batches of batch_size (left-padded). A batch runs until its longest
    request is done; only the tokens each request asked for are counted."""
    import torch

    device = next(model.parameters()).device
    sync()
    start = time.perf_counter()
    for i in range(0, len(work.prompts), batch_size):
        prompts = work.prompts[i : i + batch_size]
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        n = max(work.output_lens[i : i + batch_size])
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
    sync()
    seconds = time.perf_counter() - start
    return Result(f"transformers generate, batch {batch_size}", len(work.prompts), seconds,
                  sum(map(len, work.prompts)), sum(work.output_lens))


def single_stream(llm, prompt_len: int = 128, output_len: int = 512, vocab_size: int = 32000) -> Result:
    """Decode speed of one request alone: output tokens after the first over the time they took."""
    from llmctl.runtime import SamplingParams

    prompt = Workload.uniform(1, prompt_len, prompt_len, vocab_size, seed=1).prompts[0]
    engine = llm.engine
    seq = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    sync()
    seconds = seq.finish_time - seq.first_token_time
    return Result("llmctl single-stream decode", 1, seconds, 0, output_len - 1)


def concurrent(n: int, args: argparse.Namespace, vocab_size: int) -> Workload:
    """n requests, prompts as the main workload's, each making exactly the same number of tokens."""
    prompts = Workload.uniform(n, args.min_len, args.max_len, vocab_size, seed=3).prompts
    return Workload(prompts, [args.concurrency_output_len] * n)


def table(results: list[Result]) -> str:
    rows = [f"{'run':44} {'reqs':>5} {'seconds':>8} {'out tok/s':>10} {'total tok/s':>11}"]
    rows += [f"{r.name:44} {r.requests:>5} {r.seconds:>8.2f} {r.output_tps:>10.1f} {r.total_tps:>11.1f}"
             for r in results]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--min-len", type=int, default=100)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--hf-batch-size", type=int, default=32, help="0 skips transformers")
    parser.add_argument("--hf-requests", type=int, default=32, help="requests given to transformers")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--single-prompt-len", type=int, default=128)
    parser.add_argument("--single-output-len", type=int, default=512)
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto or fp8")
    parser.add_argument("--kv-cache-memory", type=float, help="GiB for the KV cache (default: what the GPU leaves)")
    parser.add_argument("--speculative", help="ngram: prompt-lookup speculative decoding")
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="also transformers' device_map=auto")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[],
                        help="also N requests at once for each N, every one making --concurrency-output-len tokens, "
                             "so the decode batch stays N to the end")
    parser.add_argument("--concurrency-output-len", type=int, default=256)
    args = parser.parse_args()
    if any(n < 1 for n in args.concurrency) or args.concurrency_output_len < 1:
        parser.error("--concurrency values and --concurrency-output-len must be at least 1")

    import torch

    from llmctl.runtime import LLM

    with open(f"{args.model}/config.json") as f:
        vocab = json.load(f)["vocab_size"]
    work = Workload.uniform(args.requests, args.min_len, args.max_len, vocab)
    # llmctl first: transformers' leftovers would otherwise shrink the memory left for the KV cache.
    start = time.perf_counter()
    spec = {"method": args.speculative, "num_tokens": args.num_speculative_tokens} if args.speculative else None
    memory = int(args.kv_cache_memory * 2**30) if args.kv_cache_memory else None
    llm = LLM(args.model, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype, kv_cache_memory=memory, speculative=spec,
              tensor_parallel_size=args.tensor_parallel_size)
    engine = llm.engine
    print(json.dumps({"llmctl_startup_seconds": time.perf_counter() - start,
                      "kv_cache_tokens": engine.block_manager.num_blocks * engine.config.block_size}), flush=True)
    run_llmctl(llm, Workload.uniform(8, 16, 64, vocab, seed=2), "warm-up")
    results = []
    for step in ["workload", "single", *args.concurrency]:
        if step == "workload":
            r = run_llmctl(llm, work)
        elif step == "single":
            r = single_stream(llm, args.single_prompt_len, args.single_output_len, vocab)
        else:
            r = run_llmctl(llm, concurrent(step, args, vocab), f"llmctl, {step} at once")
        results.append(r)
        print(json.dumps({**asdict(r), "output_tps": r.output_tps}), flush=True)
    print(json.dumps({"preemptions": engine.scheduler.num_preemptions}), flush=True)
    llm.close()
    del llm, engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if args.hf_batch_size:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype),
                                                                  device_map=("auto" if args.tensor_parallel_size > 1
                                                                              else "cuda") if torch.cuda.is_available()
                                                                  else None)
        hf_work = Workload(work.prompts[: args.hf_requests], work.output_lens[: args.hf_requests])
        results.append(run_transformers(model, hf_work, args.hf_batch_size))
        print(json.dumps({**asdict(results[-1]), "output_tps": results[-1].output_tps}), flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
