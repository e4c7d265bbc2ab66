"""Where W4A16 choices live between processes: the user's cache, and tuned files made per GPU.

`dispatch` looks a (shape, dtype, M bucket) key up in this order: the process's own choices; the user's
cache (~/.cache/llmctl/w4a16-<gpu>-triton<version>-<kernels version>.json, or the file LLMCTL_W4A16_CACHE
names, or none when it says `off`), which the runtime writes after each tuning; then the tuned files: those
shipped in `tuned/` (one per GPU we measure on) and those LLMCTL_W4A16_CONFIGS names (files or folders,
separated by os.pathsep; `build-image --kernel-configs` bakes one in and sets it). Only a miss everywhere
times candidates at start-up (~70 s for a 7B model).

A tuned file says what it was made for, and is used only there:
{"gpu": "NVIDIA H200", "kernels_version": 7, "triton": "3.6.0", "configs": {key: config fields}}. The Triton
version is informative: a choice from another version is checked against the dense path before its first
use (`dispatch`), since a compiler may build the same blocks differently. `llmctl bench kernels --tune
--save FILE` makes one.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
import triton

from llmctl.runtime.kernels.w4a16.common import KINDS, Config

KERNELS_VERSION = 7  # in every cache and tuned file: choices for older kernels are not reused
SHIPPED = Path(__file__).parent / "tuned"
_names: dict[int, str] = {}


def gpu_name(index: int | None = None) -> str:
    """The CUDA device's name as torch reports it ("NVIDIA H200"); cached, since the query costs microseconds."""
    index = torch.cuda.current_device() if index is None else index
    if index not in _names:
        _names[index] = torch.cuda.get_device_name(index)
    return _names[index]


def gpu_slug(gpu: str) -> str:
    """A GPU's name as a file name: "NVIDIA H200" -> "NVIDIA-H200"."""
    return "".join(c if c.isalnum() else "-" for c in gpu)


def user_cache_file(setting: str, kind: str, gpu: str, version: int) -> Path | None:
    """~/.cache/llmctl/<kind>-<gpu>-triton<Triton's version>-<version>.json, or the file `setting` (an
    environment variable's value) names (a folder: that file name inside it); None when it says off."""
    if setting.lower() in ("off", "0", "none"):
        return None
    name = f"{kind}-{gpu_slug(gpu)}-triton{triton.__version__}-{version}.json"
    if setting:  # a folder (one that exists, or a name ending in /) gets the default file name inside it
        path = Path(setting).expanduser()
        return path / name if setting.endswith("/") or path.is_dir() else path
    return Path.home() / ".cache" / "llmctl" / name


def write_atomically(path: Path, text: str) -> None:
    """Replace path's contents in one step (readers see the old file or the new one); OSError if it cannot."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # (gone once replaced; left by a failed write or replace)


def cache_file() -> Path | None:
    """The user's cache for this GPU, Triton and kernels version; None when LLMCTL_W4A16_CACHE is off."""
    return user_cache_file(os.environ.get("LLMCTL_W4A16_CACHE", ""), "w4a16", gpu_name(), KERNELS_VERSION)


def read_cache(path: Path) -> dict[str, Config]:
    """The choices a cache holds; none if it is missing or unreadable (they are tuned again)."""
    try:
        return current({k: Config(**v) for k, v in json.loads(path.read_text()).items()})
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def current(choices: dict[str, Config]) -> dict[str, Config]:
    """The choices of kernels that still exist (an earlier release's `tiled_b` is timed again, not an error)."""
    return {k: c for k, c in choices.items() if c.kind in KINDS}


def write_cache(path: Path, choices: dict[str, Config]) -> None:
    """Replace the cache atomically; a read-only home only costs the next process a re-tune."""
    with contextlib.suppress(OSError, ValueError):
        write_atomically(path, json.dumps({k: vars(v) for k, v in sorted(choices.items())}, indent=0))


def tuned_files() -> list[Path]:
    """The shipped tuned files, then those LLMCTL_W4A16_CONFIGS names (later files win on the same key)."""
    paths = sorted(SHIPPED.glob("*.json"))
    for entry in filter(None, os.environ.get("LLMCTL_W4A16_CONFIGS", "").split(os.pathsep)):
        p = Path(entry)
        paths += sorted(p.glob("*.json")) if p.is_dir() else [p]
    return paths


def read_tuned(path: Path) -> tuple[str, int, dict[str, Config]]:
    """(gpu, kernels version, choices) of a tuned file; ValueError naming the file if it is not one."""
    try:
        data = json.loads(path.read_text())
        choices = current({k: Config(**v) for k, v in data["configs"].items()})
        return str(data["gpu"]), int(data["kernels_version"]), choices
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"{path} is not a W4A16 tuned file ({type(exc).__name__}: {exc})") from None


def tuned_for(gpu: str) -> dict[str, Config]:
    """Every tuned file's choices made for this GPU name and these kernels; a broken file named by
    LLMCTL_W4A16_CONFIGS stops the start, since its owner meant it to be used."""
    out: dict[str, Config] = {}
    for path in tuned_files():
        name, version, choices = read_tuned(path)
        if name == gpu and version == KERNELS_VERSION:
            out.update(choices)
    return out


def write_tuned(path: Path, gpu: str, choices: dict[str, Config]) -> None:
    data = {"gpu": gpu, "kernels_version": KERNELS_VERSION, "triton": triton.__version__,
            "configs": {k: vars(v) for k, v in sorted(choices.items())}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
