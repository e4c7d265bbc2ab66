"""GPU time of a launch sequence as the runtime pays it: captured in a CUDA graph, replayed, L2 cleared."""

from __future__ import annotations

import torch
import triton


def graph_ms(fn, warmup: int = 2, rep: int = 8) -> float:
    """Median GPU milliseconds of fn, captured in a CUDA graph and replayed under do_bench.

    The graph takes the Python launch cost out, as the runtime's decode graphs do; do_bench clears L2
    before each replay, since in a real step the layer's weight is cold too.
    """
    fn()  # compile, and let cuBLAS pick its kernel, outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    # thread_local: CUDA calls of other threads (a tokenizer loading beside a start-up, say) are not this
    # capture's errors
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median")


def agrees(run, cfg, want: torch.Tensor, rtol: float = 1e-2) -> bool:
    """Whether run(cfg) builds on this GPU (shared memory, registers) and its output agrees with want (within
    rtol, and 1e-2 of its largest value): any build or launch failure just removes the candidate."""
    try:
        return bool(torch.allclose(run(cfg).float(), want, rtol=rtol, atol=1e-2 * want.abs().max().item()))
    except Exception:
        return False


def fastest(run, candidates, want: torch.Tensor, best=None, best_ms: float = float("inf"), rep: int = 8):
    """The quickest of candidates by `graph_ms` of run(candidate), among those whose output agrees with want
    (within 1e-2 of its largest value); best, best_ms: what a candidate must beat. A candidate that fails to
    build on this GPU is no candidate."""
    for cfg in candidates:
        if not agrees(run, cfg, want):
            continue
        try:
            ms = graph_ms(lambda c=cfg: run(c), 2, rep)
        except Exception:
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    return best
