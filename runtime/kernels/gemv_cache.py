"""Start-up GEMV choices kept between processes: the one-row 16-bit GEMV against cuBLAS (`dense_gemv`) and the
FP8 GEMV's launch configuration per tier of rows (`fp8_gemv_tune`).

Every start-up times them per weight shape (on an H100: 2.0-3.9 s for a 7B model's 16-bit linears, 6.9 s for
its FP8 ones; BENCHMARKS.md, int4 end to end); a restart on the same GPU reads them back instead, from
~/.cache/llmctl/gemv-<gpu>-triton<version>-<VERSION>.json, or the file LLMCTL_GEMV_CACHE names (`off`: none).
The file maps "<kind> <N>x<K> <dtype> <rows>" to a GemvConfig's fields, or to null for cuBLAS. Choices made
with another Triton are not read (its version is in the file name); VERSION goes up when a kernel's
candidates or the meaning of a choice change. An unreadable file is timed again, an unwritable one costs only
the next start-up its timing.

A new machine has no cache: files of the same form made on the GPUs we measure on ship in `gemv_tuned/`,
named by GPU (`shipped`), and are read under the user's cache. A choice read back is run once against the
reference before it is used (a shipped one may meet another Triton, and a compiler may build the same blocks
differently); one that disagrees or fails is timed again. gpu.sh's `gemv-tune` suite makes a shipped file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch

from llmctl.runtime.kernels.splitk import GemvConfig
from llmctl.runtime.kernels.w4a16.configs import gpu_name, gpu_slug, user_cache_file, write_atomically

VERSION = 1
SHIPPED = Path(__file__).parent / "gemv_tuned"
log = logging.getLogger(__name__)


def path(device: torch.device) -> Path | None:
    """The cache file for this CUDA device's GPU and this Triton; None when LLMCTL_GEMV_CACHE is off."""
    return user_cache_file(os.environ.get("LLMCTL_GEMV_CACHE", ""), "gemv", gpu_name(device.index), VERSION)


def shipped(device: torch.device) -> dict[str, GemvConfig | None]:
    """The choices shipped for this CUDA device's GPU (`gemv_tuned/<gpu>.json`), if any."""
    file = SHIPPED / f"{gpu_slug(gpu_name(device.index))}.json"
    return load(file) if file.exists() else {}


def known(device: torch.device) -> tuple[Path | None, dict[str, GemvConfig | None]]:
    """(the user's cache file, every choice known for this GPU: the shipped ones, then the cache's over them)."""
    file = path(device)
    return file, {**shipped(device), **load(file)}


def name(kind: str, weight: torch.Tensor, dtype: torch.dtype, rows: int) -> str:
    n, k = weight.shape
    return f"{kind} {n}x{k} {str(dtype).removeprefix('torch.')} {rows}"


def load(file: Path | None) -> dict[str, GemvConfig | None]:
    """Every well-formed choice the file holds (an entry that is not one is left out, the rest kept); none when
    it is missing or not a cache."""
    if file is None:
        return {}
    try:
        data = json.loads(file.read_text())
        entries = data.items()
    except (OSError, ValueError, AttributeError):
        return {}
    choices = {}
    for k, v in entries:
        try:
            choices[str(k)] = None if v is None else _config(v)
        except (TypeError, ValueError):
            continue
    log.info("read %d GEMV choices from %s", len(choices), file)
    return choices


def _config(fields: dict) -> GemvConfig:
    """A GemvConfig from a file's fields: positive integers, powers of two but split_k, `packed` a bool."""
    cfg = GemvConfig(**fields)
    sizes = (cfg.block_n, cfg.block_k, cfg.split_k, cfg.num_warps, cfg.num_stages)
    if not all(type(v) is int and v > 0 for v in sizes) or type(cfg.packed) is not bool:
        raise ValueError(f"not a GEMV configuration: {fields}")
    if any(v & (v - 1) for v in (cfg.block_n, cfg.block_k, cfg.num_warps)):
        raise ValueError(f"block sizes and warps must be powers of two: {fields}")
    return cfg


def save(file: Path | None, new: dict[str, GemvConfig | None]) -> None:
    """Add these choices to the file's (re-read first: another process may have written since), atomically."""
    if file is None or not new:
        return
    choices = {**load(file), **new}
    try:
        write_atomically(file, json.dumps({k: None if c is None else dataclasses.asdict(c)
                                           for k, c in sorted(choices.items())}, indent=0))
    except (OSError, ValueError) as exc:  # (ValueError: a setting that names a directory, such as ".")
        log.debug("could not write the GEMV choices to %s: %s", file, exc)
