"""Which W4A16 path and blocks to use for a shape: timed once per (shape, M bucket, GPU), then kept.

The best path changes with M: split-K GEMV while the weight stream is all that matters (decode), a GEMV
taking several rows a program for a few rows, tensor-core tiles in between, dequantize + cuBLAS once the GEMM is compute-bound. Rather than guess the
crossovers per GPU, each M bucket (M rounded up to a power of two) takes the fastest of a short list of
candidates timed with `triton.testing.do_bench`, unless the user's cache or a tuned file for this GPU
already holds the choice (`configs` says where they live; a tuned file's choice is checked against the
dense path before its first use).

The runtime settles every bucket its steps can meet at start-up (`pretune`), so tuning never stalls a
served step nor runs inside a CUDA-graph capture; if a bucket is still first met during a capture, a
fixed heuristic choice is used for it instead (and not cached), since timing would need host syncs. Off
CUDA (Triton's interpreter) the heuristic is used too.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
import triton

from llmctl.runtime.kernels import compiling, timing
from llmctl.runtime.kernels.timing import graph_ms
from llmctl.runtime.kernels.w4a16 import configs
from llmctl.runtime.kernels.w4a16.common import Config, block_k_for, dequant_mm, fits_groups
from llmctl.runtime.kernels.w4a16.gemv import gemv
from llmctl.runtime.kernels.w4a16.gemv_h2 import block_k_h2, gemv_h2
from llmctl.runtime.kernels.w4a16.gemv_rows import ROWS, gemv_rows
from llmctl.runtime.kernels.w4a16.pack import PackedW4
from llmctl.runtime.kernels.w4a16.tiled import tiled

PATHS = {"gemv": gemv, "gemv_h2": gemv_h2, "gemv_rows": gemv_rows, "tiled": tiled, "dense": dequant_mm}

MAX_BUCKET = 8192
_tuned: dict[str, Config] = {}  # this process's choices (the user's cache once read)
_from_files: dict[str, Config] = {}  # tuned files' choices for this GPU, each checked before its first use
_disk_loaded: set[str] = set()  # cache files and GPU names already read
_timed = [0]  # buckets timed by this process (what pretune reports)


def bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), MAX_BUCKET)


def _key(x: torch.Tensor, w: PackedW4) -> str:
    return _key_for(x.shape[0], w, x.dtype)


def _key_for(m: int, w: PackedW4, dtype: torch.dtype) -> str:
    return (f"{w.in_features}x{w.out_features}:g{w.group_size}:{'perm' if w.perm is not None else 'seq'}:"
            f"{str(dtype).removeprefix('torch.')}:m{bucket(m)}")


def heuristic(m: int, w: PackedW4, interpreted: bool = False) -> Config:
    """A reasonable choice without timing (interpreter, or a bucket first seen during graph capture).
    The interpreter pays per program and per op, not per element: there, blocks as large as the weight."""
    gs, k = w.group_size, w.in_features
    if not w.interleaved:  # K or the groups are not multiples of 32: only the dense path reads this packing
        return Config("dense")
    if interpreted:
        bk = block_k_for(gs, min(512, max(16, triton.next_power_of_2(k))))
        bn = min(512, max(16, triton.next_power_of_2(w.out_features)))
        if bk is None:
            return Config("dense")
        if m <= 4:
            return Config("gemv", 1, bn, bk)
        return Config("tiled", min(64, max(16, triton.next_power_of_2(m))), bn, bk)
    bk = block_k_for(gs, 128)
    if bk is None:
        return Config("dense")
    if m <= 4:  # the fp16x2 GEMV runs the fp32 one for other dtypes
        return Config("gemv_h2", 1, 64, block_k_h2(gs) or bk, max(1, min(8, k // 512)), 4, 1)
    bm = min(64, max(16, triton.next_power_of_2(m)))
    return Config("tiled", bm, 128, bk, 4 if m <= 16 else 2, 8, 3)


# Tiled (block_m, block_n, block_k, warps, stages) worth timing. wgmma wants block_n of 64 or more; small
# M reads each weight tile once with 16 to 64 rows of x; large M wants the tall x tiles of a GEMM.
# (128, 128, 64, 8, 3) is left out: Triton 3.6 gave wrong sums with it on an H200 (see BENCHMARKS.md).
SMALL_TILES = ((64, 128, 4, 3), (64, 128, 4, 4), (128, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4))
LARGE_TILES = ((128, 128, 128, 8, 4), (128, 128, 128, 8, 3), (256, 128, 64, 8, 3), (256, 128, 64, 8, 4),
               (128, 64, 64, 4, 3), (256, 64, 64, 4, 3), (64, 64, 128, 4, 3))


def candidates(m: int, w: PackedW4, dtype: torch.dtype = torch.float16) -> list[Config]:
    """The configurations timed for an M bucket; split-K choices with less than one block a split are dropped."""
    k, gs = w.in_features, w.group_size
    if not w.interleaved:
        return [Config("dense")]
    out: list[Config] = []
    h2 = dtype == torch.float16 and block_k_h2(gs)
    if m <= 8 and h2:
        for bn, warps in ((64, 4), (256, 2), (128, 8), (64, 8)):
            for split in (1, 2, 4, 8, 16):
                for stages in (1, 2):  # 2: each step's loads issued a step ahead (gemv_h2's PREFETCH)
                    out.append(Config("gemv_h2", 1, bn, h2, split, warps, stages))
    if 2 <= m <= 16 and h2:  # several rows a program (as many as the bucket has, up to 8): each word unpacked once
        rows = min(bucket(m), ROWS[-1])
        for bn in (64, 128):
            for split in (1, 2, 4, 8):
                out.extend(Config("gemv_rows", rows, bn, h2, split, 4, stages) for stages in (1, 2))
    if m <= 8 and not h2:  # (for fp16 x the fp32 GEMV never beat gemv_h2: BENCHMARKS.md's W4A16 table)
        for bn, bk, warps in ((32, 256, 4), (64, 256, 4), (64, 128, 4), (128, 256, 4), (32, 256, 2)):
            for split in (1, 2, 4, 8, 16):
                out.append(Config("gemv", 1, bn, bk, split, warps, 2))
    # Tensor-core tiles compete at every M: even at M=1 a padded 16-row tile may beat the FMA GEMV.
    if m <= 64:
        bm = 16 if m <= 16 else 32 if m <= 32 else 64
        for bn, bk, warps, stages in SMALL_TILES:
            for split in (1, 2, 4, 8):
                out.append(Config("tiled", bm, bn, bk, split, warps, stages))
    else:
        for bm, bn, bk, warps, stages in LARGE_TILES:
            if bm <= max(64, triton.next_power_of_2(m)):
                for split in (1, 2) if m <= 256 else (1,):
                    out.append(Config("tiled", bm, bn, bk, split, warps, stages))
    out = [c for c in out if fits_groups(c.block_k, gs) and triton.cdiv(k, c.split_k) >= c.block_k]
    if not any(c.kind == "tiled" for c in out):  # odd groups (96, 160 ...) or a tiny K: the largest block that
        out.append(Config("tiled", 16 if m <= 16 else 64, 64, block_k_for(gs, 128), 1, 4, 3))  # fits (32 always)
    return out + [Config("dense")] if m >= 128 else out


def _load_disk() -> Path | None:
    """Read the user's cache and this GPU's tuned files once; returns the cache's path (None: off)."""
    path = configs.cache_file()
    if path is not None and str(path) not in _disk_loaded:
        _disk_loaded.add(str(path))
        _tuned.update(configs.read_cache(path))
    gpu = configs.gpu_name()
    if gpu not in _disk_loaded:
        _disk_loaded.add(gpu)
        _from_files.update(configs.tuned_for(gpu))
    return path


def agrees(cfg: Config, x: torch.Tensor, w: PackedW4, bias: torch.Tensor | None, want: torch.Tensor) -> bool:
    """Whether the candidate builds on this GPU and its output matches `want` (`timing.agrees`)."""
    return timing.agrees(lambda c: PATHS[c.kind](x, w, bias, c), cfg, want, rtol=2e-2)


FINALISTS = 4  # candidates timed again at full length (see `tune`)
QUICK_MS = 2  # do_bench's repetition budget for the first round (graph_ms's default: 8)


def time_config(cfg: Config, x: torch.Tensor, w: PackedW4, bias: torch.Tensor | None,
                want: torch.Tensor, rep: int = 8) -> float:
    """Milliseconds of one candidate; infinite if it fails to build or strays from `want`, so a miscompiled
    candidate can never be picked."""
    if not agrees(cfg, x, w, bias, want):
        return float("inf")
    return graph_ms(lambda: PATHS[cfg.kind](x, w, bias, cfg), rep=rep)


def tune(x: torch.Tensor, w: PackedW4, bias: torch.Tensor | None = None) -> Config:
    """Time every candidate for x's M bucket and remember the fastest. Two rounds: every candidate on a short
    repetition budget, then the FINALISTS fastest again on the full one, and the fastest of those wins. A
    bucket's 36-76 candidates each cost ~15 ms on the full budget, most of a warm start-up's ~22 s."""
    want = PATHS["dense"](x, w, bias).float()
    quick = {cfg: time_config(cfg, x, w, bias, want, QUICK_MS) for cfg in candidates(x.shape[0], w, x.dtype)}
    finalists = sorted((cfg for cfg, ms in quick.items() if ms != float("inf")), key=quick.get)[:FINALISTS]
    times = {cfg: graph_ms(lambda cfg=cfg: PATHS[cfg.kind](x, w, bias, cfg)) for cfg in finalists}
    # nothing else built and agreed with the reference on this GPU: the dense path
    best = min(times, key=times.get) if times else Config("dense")
    _tuned[_key(x, w)] = best
    _timed[0] += 1
    return best


def choose(x: torch.Tensor, w: PackedW4, bias: torch.Tensor | None = None) -> Config:
    if x.device.type != "cuda":
        return heuristic(x.shape[0], w, interpreted=True)
    key = _key(x, w)
    cfg = _tuned.get(key)  # every call after the first: no file or environment lookups
    if cfg is not None:
        return cfg
    path = _load_disk()
    cfg = _tuned.get(key)
    if cfg is not None:
        return cfg
    capturing = torch.cuda.is_current_stream_capturing()
    made = _from_files.get(key)
    if compiling.is_warming():  # a forward compiled ahead (compiling.ahead): nothing runs, so nothing is decided
        return made or heuristic(x.shape[0], w)
    if made is not None and (capturing or agrees(made, x, w, bias, PATHS["dense"](x, w, bias).float())):
        _tuned[key] = made  # (pretune has checked every bucket before the runtime captures a graph)
        return made
    if capturing:
        return heuristic(x.shape[0], w)
    cfg = tune(x, w, bias)
    if path is not None:
        configs.write_cache(path, _tuned)
    return cfg


def _buckets(weights: Iterable[PackedW4], dtype: torch.dtype, max_m: int):
    """(key, x, w) for every M bucket up to max_m's of each weight, x a random [m, K] made once per K."""
    xs: dict[int, torch.Tensor] = {}
    for w in weights:
        for m in (1 << i for i in range(bucket(max_m).bit_length())):
            if w.in_features not in xs:
                xs[w.in_features] = torch.randn(bucket(max_m), w.in_features, dtype=dtype, device=w.qweight.device)
            yield _key_for(m, w, dtype), xs[w.in_features][:m], w


def precompile(weights: list[PackedW4], dtype: torch.dtype, max_m: int, retune: bool = False) -> int:
    """Compile on every core (`compiling.in_parallel`) every configuration that settling these buckets will
    launch: each bucket's candidates (a tuned file's choice alone where it has one; none where the process
    or the user's cache already holds a choice; all with `retune`). A cold 7B int4 start-up needs 141
    distinct kernels (1,684 launches over 4 shapes' 14 buckets, shared where the compiled code is the
    same), 0.4-0.7 s each on one core (scripts/w4a16_compile_time.py). Returns the launches submitted (0: not possible
    here). The dense path's kernel (one a dtype) compiles when first timed."""
    wanted = []
    for key, x, w in _buckets(weights, dtype, max_m):
        if key in _tuned and not retune:
            continue
        made = None if retune else _from_files.get(key)
        wanted += [(cfg, x, w) for cfg in ([made] if made else candidates(x.shape[0], w, dtype)) if cfg.kind != "dense"]
    done = compiling.in_parallel(lambda cfg=cfg, x=x, w=w: PATHS[cfg.kind](x, w, None, cfg) for cfg, x, w in wanted)
    return len(wanted) if done else 0


def pretune(weights: Iterable[PackedW4], dtype: torch.dtype, max_m: int) -> int:
    """Settle now every M bucket up to max_m's for each weight shape, so that no step of a running engine
    stops to time candidates (a prefill chunk of 512-4096 tokens used to meet its bucket mid-run).
    Cached buckets cost a lookup, tuned files' a check; what they launch is compiled in parallel first.
    Returns how many buckets were timed."""
    _load_disk()
    weights = list(weights)
    precompile(weights, dtype, max_m)
    before = _timed[0]
    for key, x, w in _buckets(weights, dtype, max_m):
        if key not in _tuned:
            choose(x, w)  # settles the bucket and saves a timed one: a cut start-up keeps it
    return _timed[0] - before


def tune_all(weights: Iterable[PackedW4], dtype: torch.dtype, max_m: int) -> dict[str, Config]:
    """Time every bucket afresh, whatever a cache or tuned file holds (what a tuned file is made of)."""
    weights = list(weights)
    precompile(weights, dtype, max_m, retune=True)
    return {key: tune(x, w) for key, x, w in _buckets(weights, dtype, max_m)}


def w4a16_linear(x: torch.Tensor, w: PackedW4, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequant(W).T + bias through the fastest path for this shape; x: [..., K] -> [..., N]."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    cfg = choose(x2, w, bias)  # the path checks the arguments (tuning starts with the checked dense path)
    return PATHS[cfg.kind](x2, w, bias, cfg).view(*lead, w.out_features)
