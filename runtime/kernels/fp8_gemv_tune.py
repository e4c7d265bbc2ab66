"""Start-up choice of the FP8 GEMV's launch configuration, per weight shape and tier of rows.

`fp8_gemv.default_config` picks a configuration from the shape alone. On an H100 (BENCHMARKS.md, "FP8 linear
kernels") the fastest of a few was 9-23% quicker at one row (the word-typed kernel, `GemvConfig.packed`, won
on qkv and o_proj) and 10-21% at 2-16 rows, by shape. So before serving, `pretune` times these candidates for
every distinct FP8 weight at each tier of rows (`tier`: one row, 2-8, 9-16, 17-32), each checked against
`gemv_ref` first, the default among them; `chosen` is what `fp8_linear` launches. The 2-8 tier has its own
choice although it runs the same 16-row kernel as 9-16: on an H200 the choice timed at 16 rows was 13-30%
slower than the default at 2-8 rows on qkv and gate_up (2026-12-05). The choices are kept for the next process
on this GPU (`gemv_cache`). LLMCTL_FP8_GEMV_TUNE=0 keeps the defaults.
"""

from __future__ import annotations

import os

import torch

from llmctl.runtime.kernels import fp8_gemv, gemv_cache
from llmctl.runtime.kernels.compiling import in_parallel
from llmctl.runtime.kernels.splitk import GemvConfig

# One row: the byte-typed kernel, and the word-typed one loading in-step (stages 1) or a step ahead (2).
ONE_ROW = tuple(GemvConfig(bn, bk, split, warps, stages, packed)
                for bn, bk, warps in ((16, 512, 4), (8, 1024, 4), (32, 256, 4)) for split in (1, 2, 4)
                for stages, packed in ((1, False), (1, True), (2, True)))
# Several rows, on tensor cores.
ROWS = tuple(GemvConfig(bn, bk, split, warps, stages)
             for bn, bk, warps, stages in ((64, 256, 4, 3), (64, 128, 4, 4), (128, 128, 8, 3), (32, 256, 4, 3))
             for split in (1, 2, 4, 8))
_chosen: dict[tuple, GemvConfig] = {}


def tier(m: int) -> int:
    """The row count m rows are timed at: 1, 4 (2-8 rows), then each tensor-core block (16, 32, 64)."""
    return 1 if m == 1 else 4 if m <= 8 else fp8_gemv.block_m_for(m)


def key(m: int, weight: torch.Tensor, dtype: torch.dtype) -> tuple:
    return tuple(weight.shape), dtype, weight.device, tier(m)


def chosen(m: int, weight: torch.Tensor, dtype: torch.dtype) -> GemvConfig | None:
    """The timed choice for m rows of x against this weight, or None (the default: untimed)."""
    return _chosen.get(key(m, weight, dtype))


def tiers(max_rows: int) -> list[int]:
    """The row counts timed for decode batches up to max_rows: each tier's, or max_rows where that is less."""
    return sorted({min(tier(m), max_rows) for m in range(1, max_rows + 1)})


def pretune(layers, dtype: torch.dtype, max_rows: int) -> int:
    """layers: (weight, scale) pairs of CUDA FP8 weights. For each distinct shape and tier up to max_rows,
    remember the fastest candidate (all compiled on every core first), unless an earlier process on this GPU
    did (`gemv_cache`). Returns the (shape, tier) pairs timed."""
    if os.environ.get("LLMCTL_FP8_GEMV_TUNE", "1") == "0" or dtype not in fp8_gemv.X_DTYPES or max_rows < 1:
        return 0
    todo = [(m, w, s) for w, s in {tuple(w.shape): (w, s) for w, s in layers if w.is_cuda}.values()
            for m in tiers(max_rows) if key(m, w, dtype) not in _chosen]
    if not todo:
        return 0
    from llmctl.runtime.kernels.timing import agrees

    cache, stored = gemv_cache.known(todo[0][1].device)
    xs = {(m, w.shape[1]): torch.randn(m, w.shape[1], dtype=dtype, device=w.device) for m, w, _ in todo}
    for m, w, s in todo:  # a choice read back is used once it agrees with gemv_ref here
        x = xs[m, w.shape[1]]
        choice = stored.get(gemv_cache.name("fp8", w, dtype, m))
        if choice is not None and agrees(lambda c, x=x, w=w, s=s: fp8_gemv.gemv(x, w, s, cfg=c), choice,
                                         fp8_gemv.gemv_ref(x, w, s).float()):
            _chosen[key(m, w, dtype)] = choice
    todo = [(m, w, s) for m, w, s in todo if key(m, w, dtype) not in _chosen]
    in_parallel(lambda m=m, w=w, s=s, c=c: fp8_gemv.gemv(xs[m, w.shape[1]], w, s, cfg=c)
                for m, w, s in todo for c in candidates(m))
    for m, w, s in todo:
        _chosen[key(m, w, dtype)] = fastest(xs[m, w.shape[1]], w, s)
    gemv_cache.save(cache, {gemv_cache.name("fp8", w, dtype, m): _chosen[key(m, w, dtype)] for m, w, _ in todo})
    return len(todo)


def candidates(m: int) -> tuple[GemvConfig, ...]:
    return ONE_ROW if m == 1 else ROWS


def fastest(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> GemvConfig:
    """The quickest configuration for x's rows that agrees with `gemv_ref`; the default if none beats it."""
    from llmctl.runtime.kernels import timing

    m, (n, k) = x.shape[0], weight.shape
    default = fp8_gemv.default_config(m, n, k, x.device)
    return timing.fastest(lambda cfg: fp8_gemv.gemv(x, weight, scale, cfg=cfg), (default, *candidates(m)),
                          fp8_gemv.gemv_ref(x, weight, scale).float(), default, rep=4)
