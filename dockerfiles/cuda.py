"""Which CUDA the image's torch runs on, the NVIDIA driver that needs, and a CUDA base that agrees with it.

torch's Linux wheels bring their own CUDA libraries as pip packages (nvidia-cuda-runtime 13.0.x, or
nvidia-cuda-runtime-cu12 12.8.x for a cu128 build), so the wheelhouse says which CUDA the image really runs.
A CUDA base of another version only adds a second copy of the libraries, and tells the container runtime
(NVIDIA_REQUIRE_CUDA) a driver requirement that is not torch's: on a host whose driver is new enough for
the base but not for torch, the server would start and then fail on its first CUDA call. So a CUDA base must
match, and the image is labelled with the driver it needs.
"""

from __future__ import annotations

import re
from pathlib import Path

# The oldest Linux driver of each CUDA release (NVIDIA's CUDA toolkit release notes, table 3).
MIN_DRIVER = {"12.4": "550.54.14", "12.5": "555.42.02", "12.6": "560.28.03", "12.8": "570.26",
              "12.9": "575.51.03", "13.0": "580.65.06"}
# A runtime base per CUDA release, all Ubuntu 24.04 (Python 3.12, glibc 2.39).
CUDA_BASES = {"12.8": "nvidia/cuda:12.8.1-runtime-ubuntu24.04", "12.9": "nvidia/cuda:12.9.1-runtime-ubuntu24.04",
              "13.0": "nvidia/cuda:13.0.1-runtime-ubuntu24.04"}

_RUNTIME_WHEEL = re.compile(r"nvidia_cuda_runtime(?:_cu\d+)?-(\d+)\.(\d+)\.")
_TORCH_WHEEL = re.compile(r"torch-[^-]+\+cu(\d+?)(\d)-")  # a local build tag: +cu128, +cu130
_CUDA_BASE = re.compile(r"(?:^|/)nvidia/cuda:(\d+)\.(\d+)")


def wheels_cuda(wheels: Path) -> str | None:
    """The CUDA release ("13.0") the wheelhouse's torch runs on; None for a CPU torch or no torch."""
    names = [p.name for p in wheels.glob("*.whl")]
    for pattern in (_RUNTIME_WHEEL, _TORCH_WHEEL):
        for name in names:
            if match := pattern.match(name):
                return f"{int(match.group(1))}.{match.group(2)}"
    return None


def base_cuda(base: str) -> str | None:
    """The CUDA release of an nvidia/cuda base image; None for any other base."""
    match = _CUDA_BASE.search(base)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def check_base(base: str, cuda: str | None) -> None:
    """ValueError when a CUDA base and the wheels' CUDA disagree, naming a base that fits."""
    have = base_cuda(base)
    if cuda is None or have is None or have == cuda:
        return
    fits = f"--base {CUDA_BASES[cuda]}" if cuda in CUDA_BASES else f"an nvidia/cuda:{cuda}.x runtime base"
    raise ValueError(f"the base {base} is CUDA {have} but the wheels' torch runs on CUDA {cuda}: use {fits}, "
                     f"or constrain torch to a CUDA {have} build (-c constraints.txt)")


def driver_requirement(cuda: str | None) -> str:
    """What the host needs, in words: for the build's output and the image's label."""
    if cuda is None:
        return "no GPU driver (a CPU build of torch)"
    driver = MIN_DRIVER.get(cuda)
    return f"NVIDIA driver >= {driver} (CUDA {cuda})" if driver else f"an NVIDIA driver for CUDA {cuda}"
