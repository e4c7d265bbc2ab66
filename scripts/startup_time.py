"""Seconds from a fresh process to its first generated token: what a new pod pays before it can serve.

    python scripts/startup_time.py --model DIR [--dtype float16] [--log]

Prints one line: the imports, `LLM(...)` (weights, kernel tuning or tuned files, the KV cache, CUDA graphs)
and the first token, each in seconds, and the whole. Run it in a fresh process with a fresh TRITON_CACHE_DIR
(and LLMCTL_W4A16_CACHE=off LLMCTL_GEMV_CACHE=off) to see a new machine's start; gpu.sh's startup suite does.
"""

from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--log", action="store_true", help="also print the runtime's start-up log, each line with "
                        "the seconds since the process started (where the time goes)")
    args = parser.parse_args()
    if args.log:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(relativeCreated)8.0f ms  %(name)s: %(message)s")
    from llmctl.runtime import LLM, SamplingParams

    imported = time.perf_counter()
    llm = LLM(args.model, dtype=args.dtype)
    built = time.perf_counter()
    llm.generate([[1] * 16], SamplingParams(max_tokens=1, ignore_eos=True))
    done = time.perf_counter()
    print(f"start-up {done - START:.1f} s: imports {imported - START:.1f}, LLM() {built - imported:.1f}, "
          f"first token {done - built:.2f}")


if __name__ == "__main__":
    main()
