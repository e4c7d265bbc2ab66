"""What structured outputs cost the decode: the same batch with and without a JSON-schema constraint.

    python scripts/structured_bench.py --model DIR [--batches 64 256] [--max-tokens 256]

DIR needs a byte-level tokenizer whose vocabulary fits the model's (a random model of a published shape with
any such tokenizer will do: the masks' cost depends on the vocabulary, not on the weights). The constrained
requests ask for an array of at least 4,096 records, so that a random model keeps to the grammar for all
of max_tokens, like the unconstrained requests (ignore_eos): both runs decode the same number of tokens. Prints
output tokens/s for each, their ratio, and the host time the masks took per step.
"""

from __future__ import annotations

import argparse
import json
import time

SCHEMA = {"type": "array", "items": {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "count": {"type": "integer", "minimum": 0, "maximum": 9999},
    "kind": {"enum": ["alpha", "beta", "gamma"]}, "ok": {"type": "boolean"}},
    "required": ["name", "count", "kind", "ok"], "additionalProperties": False}, "minItems": 4096}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, nargs="*", default=[],
                        help="also run the constrained batch with llguidance executors of these many threads")
    args = parser.parse_args()

    from llmctl.runtime.llm import LLM
    from llmctl.runtime.sampling_params import SamplingParams
    from llmctl.runtime.structured import StructuredOutput

    llm = LLM(args.model, max_num_seqs=max(args.batches), max_model_len=1024)
    grammars = llm.engine.grammars
    fill = grammars.fill
    spent = {"s": 0.0, "calls": 0}

    def timed_fill(matchers, bitmask):
        start = time.perf_counter()
        fill(matchers, bitmask)
        spent["s"] += time.perf_counter() - start
        spent["calls"] += 1

    grammars.fill = timed_fill

    # Where the engine thread's time goes, per step: waiting for the GPU's tokens, waiting for the masks, the rest.
    from llmctl.runtime.layers import sampler as sampler_module

    clock = {"step": 0.0, "tokens": 0.0, "masks": 0.0, "steps": 0}
    engine, runner = llm.engine, llm.engine.model_runner

    def timing(owner, name, key):
        original = getattr(owner, name)

        def timed(*a, **k):
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                clock[key] += time.perf_counter() - start
                clock["steps"] += key == "step"
        setattr(owner, name, timed)

    timing(engine, "step", "step")
    timing(runner.masks, "apply", "masks")
    timing(sampler_module.PendingSample, "wait", "tokens")
    spec = StructuredOutput.json_schema(SCHEMA)
    plain = SamplingParams(temperature=1.0, seed=0, max_tokens=args.max_tokens, ignore_eos=True)
    constrained = SamplingParams(temperature=1.0, seed=0, max_tokens=args.max_tokens, structured=spec)
    prompts = [f"Record {i} as JSON:" for i in range(max(args.batches))]
    llm.generate(prompts[:8], [plain] * 4 + [constrained] * 4)  # warm-up: graphs, kernels, the tokenizer's tables

    # The device waits for the masks (HostGate) or the host does: greedy outputs must be the same either way.
    greedy = SamplingParams(temperature=0.0, max_tokens=64, structured=spec)
    n = min(64, len(prompts))
    same = []
    for device_waits in (False, True):
        runner.masks.device_waits = device_waits
        same.append([r.outputs[0].token_ids for r in llm.generate(prompts[:n], [greedy] * n)])
    print(f"greedy, {n} constrained: host-wait and device-wait outputs {'equal' if same[0] == same[1] else 'DIFFER'}; "
          f"device waits: {runner.masks._gate is not None}")

    rows = []
    for batch in args.batches:
        result = {}
        for name, params in (("plain", plain), ("host waits", constrained), ("json_schema", constrained)):
            runner.masks.device_waits = name != "host waits"
            spent.update(s=0.0, calls=0)
            clock.update(step=0.0, tokens=0.0, masks=0.0, steps=0)
            start = time.perf_counter()
            out = llm.generate(prompts[:batch], [params] * batch)
            seconds = time.perf_counter() - start
            n = max(clock["steps"], 1)
            print(f"batch {batch} {name}: per step {clock['step'] / n * 1e3:.2f} ms, waiting for tokens "
                  f"{clock['tokens'] / n * 1e3:.2f} ms, for masks {clock['masks'] / n * 1e3:.2f} ms")
            tokens = sum(len(r.outputs[0].token_ids) for r in out)
            result[name] = (tokens / seconds, tokens, spent["s"] / max(spent["calls"], 1) * 1e3)
            if name != "plain":
                print(f"batch {batch} {name}: {tokens / seconds:,.1f} tok/s")
            if name == "json_schema":
                cut = [r.outputs[0] for r in out if r.outputs[0].finish_reason == "length"]
                print(f"batch {batch}: {len(cut)} cut at max_tokens; e.g. {cut[0].text[:72]!r}" if cut else "")
                odd = [o for o in cut if not o.text.lstrip(" ").startswith("[")]
                for o in odd[:3]:
                    print("not an array?", repr(o.text[:40]), o.token_ids[:4],
                          [llm.tokenizer.decode([t]) for t in o.token_ids[:4]])
                print(f"batch {batch}: {len(odd)} of {len(cut)} cut outputs do not open with '['")
                ended = [o for r in out if (o := r.outputs[0]).finish_reason == "stop"]
                for o in ended:
                    json.loads(o.text)  # a finished output is complete JSON
        ratio = result["json_schema"][0] / result["plain"][0]
        rows.append((batch, *result["plain"][:2], *result["json_schema"], ratio))

    import llguidance

    for threads in args.threads:
        grammars._executor = llguidance.LLExecutor(num_threads=threads)
        for batch in args.batches:
            spent.update(s=0.0, calls=0)
            start = time.perf_counter()
            out = llm.generate(prompts[:batch], [constrained] * batch)
            rate = sum(len(r.outputs[0].token_ids) for r in out) / (time.perf_counter() - start)
            print(f"{threads} threads, batch {batch}: {rate:,.1f} tok/s, mask "
                  f"{spent['s'] / max(spent['calls'], 1) * 1e3:.2f} ms/step")

    print(f"{'batch':>5} {'plain tok/s':>12} {'tokens':>7} {'schema tok/s':>13} {'tokens':>7} "
          f"{'mask ms/step':>13} {'ratio':>6}")
    for batch, p, pt, s, st, ms, ratio in rows:
        print(f"{batch:>5} {p:>12,.1f} {pt:>7} {s:>13,.1f} {st:>7} {ms:>13.2f} {ratio:>6.3f}")


if __name__ == "__main__":
    main()
