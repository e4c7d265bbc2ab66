"""Compiling Triton kernels ahead of their first launch, on every core.

A configuration's first launch compiles it (0.4-0.7 s on one core); start-up tuning launches dozens to
hundreds of them one after the other. Triton's compiler releases the GIL, so `in_parallel` makes each of
the given launches only compile, under Triton's AsyncCompileMode on a pool of threads, and returns when all
are built (2 cores: 1.9x, scripts/w4a16_compile_time.py). Launch sites go through `start`, which compiles
instead of running inside the block; outputs stay unset there. Triton without AsyncCompileMode (before
3.4) or a single core: nothing happens, and kernels compile at their first launch as before.

`ahead` does the same for whole forward passes before their first real run (the profiling pass, the decode
graphs' warm-up): every launch site in `runtime/kernels` goes through `start`, so a forward run inside it
only compiles its kernels, all at once, instead of one after the other as each is first met; the torch ops
between them run on whatever the unrun kernels left in their outputs, and nothing is kept.
LLMCTL_COMPILE_AHEAD=0 turns it off.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar

import triton

log = logging.getLogger(__name__)
_warming: ContextVar[bool] = ContextVar("llmctl_warming", default=False)


def start(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs); inside `warming()` only compiled for this GPU, not run."""
    if _warming.get():
        kernel.warmup(*args, grid=grid, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def is_warming() -> bool:
    """Whether `start` only compiles here: outputs are not computed, so nothing may be checked or timed."""
    return _warming.get()


@contextlib.contextmanager
def warming():
    """`start` in this block compiles its kernels and runs nothing."""
    token = _warming.set(True)
    try:
        yield
    finally:
        _warming.reset(token)


def in_parallel(launches: Iterable[Callable[[], object]]) -> bool:
    """Call each launch (a function that reaches `start`) so that it only compiles, all on a pool of threads;
    return once every kernel is built, or False where this Triton or machine cannot. A launch that raises,
    or a kernel that fails to compile, is left for its real first launch to report."""
    mode = getattr(triton, "AsyncCompileMode", None)
    workers = min(32, os.cpu_count() or 1)
    if mode is None or workers < 2:
        return False
    try:
        with ThreadPoolExecutor(workers) as pool, _async_mode(mode, pool), warming():
            for launch in launches:
                try:
                    launch()
                except Exception:  # e.g. a configuration that does not fit this GPU: its timing drops it
                    continue
    except Exception:  # a failed compile raises again where the configuration is first launched
        log.debug("parallel compilation stopped early", exc_info=True)
    return True


def ahead(forwards: Iterable[Callable[[], object]]) -> bool:
    """Run each forward pass so that its Triton kernels only compile, on every core (see the module doc)."""
    if os.environ.get("LLMCTL_COMPILE_AHEAD", "1") == "0":
        return False
    return in_parallel(forwards)


def _async_mode(mode, pool):
    try:
        return mode(pool, ignore_errors=True)
    except TypeError:  # Triton versions whose AsyncCompileMode takes the executor alone
        return mode(pool)
