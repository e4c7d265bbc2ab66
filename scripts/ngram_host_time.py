"""Host time of one prompt-lookup proposal (`speculative.ngram_drafts`) beside the whole-history window match
it replaced, on histories of 512 to 32,768 tokens: random tokens (no match past n = 1, the worst case) and a
repeating 64-token pattern (many candidates). Run on the serving host's CPU:

    python scripts/ngram_host_time.py
"""

from __future__ import annotations

import time

import numpy as np

from llmctl.runtime.speculative import ngram_drafts


def window_match(tokens: np.ndarray, k: int, min_n: int, max_n: int) -> list[int]:
    """The earlier implementation: every window of the history against the last n tokens, for each n."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
        hits = np.flatnonzero((windows == tokens[length - n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start : start + k].tolist()
    return []


def per_call_us(fn, tokens: np.ndarray, calls: int = 200) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn(tokens, 5, 1, 4)
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"{'tokens':>7} {'history':>10} {'window match us':>16} {'ngram_drafts us':>16} {'speedup':>8}")
    for length in (512, 2048, 8192, 32768):
        for name, tokens in (("random", rng.integers(0, 32000, length)),
                             ("repeating", np.tile(rng.integers(0, 32000, 64), length // 64))):
            assert window_match(tokens, 5, 1, 4) == ngram_drafts(tokens, 5, 1, 4)
            old, new = per_call_us(window_match, tokens), per_call_us(ngram_drafts, tokens)
            print(f"{length:>7} {name:>10} {old:>16.0f} {new:>16.0f} {old / new:>7.0f}x")


if __name__ == "__main__":
    main()
