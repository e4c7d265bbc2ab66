"""The base image: which Python and glibc it has, so that the host builds wheels that run on it."""

from __future__ import annotations

import sys
from dataclasses import dataclass

DEFAULT_BASE = "nvidia/cuda:13.0.1-runtime-ubuntu24.04"  # torch's default wheels run on CUDA 13.0 (cuda.py)

# Python that a distribution's own package installs, for bases that come without one (CUDA bases do).
DISTRO_PYTHON = {"ubuntu-22.04": "3.10", "ubuntu-24.04": "3.12", "debian-12": "3.11", "debian-13": "3.13"}
MIN_PYTHON = (3, 10)
# glibc of official distribution images, for bases described without an engine (--context-only); any other
# is assumed to have manylinux_2_28's, which some wheels (llguidance's) are too new for.
DISTRO_GLIBC = {"debian:12": "2.36", "debian:bookworm": "2.36", "debian:13": "2.41", "debian:trixie": "2.41",
                "ubuntu:22.04": "2.35", "ubuntu:jammy": "2.35", "ubuntu:24.04": "2.39", "ubuntu:noble": "2.39"}

# Runs inside the base with `sh -c`; prints key=value lines. Python is asked only if the base has it.
PROBE = (
    'echo "arch=$(uname -m)"; echo "glibc=$(getconf GNU_LIBC_VERSION | cut -d" " -f2)"; '
    "if command -v python3 >/dev/null; then "
    "python3 -c 'import sys; print(\"python=%d.%d\" % sys.version_info[:2])'; "
    'else . /etc/os-release; echo "os=$ID-$VERSION_ID"; fi'
)


@dataclass(frozen=True)
class BaseImage:
    """`install_python`: the base has no python3, so the image installs the distribution's."""

    name: str
    python: str  # "3.11"
    glibc: str = "2.28"  # the oldest manylinux that wheels may target; "2.28" runs on any newer glibc
    arch: str = "x86_64"
    install_python: bool = False

    def __post_init__(self) -> None:
        parts = self.python.split(".")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"python version must look like 3.11, got {self.python!r}")
        if tuple(map(int, parts)) < MIN_PYTHON:
            raise ValueError(f"llmctl needs Python >= 3.10; the base {self.name} has {self.python}")


def assumed_base(name: str, python: str | None) -> BaseImage:
    """A base described without an engine (--context-only): the CUDA bases llmctl names are known; any
    other is taken to have python3, of the version given or else the host's."""
    from llmctl.dockerfiles.cuda import CUDA_BASES

    if name == DEFAULT_BASE or name in CUDA_BASES.values():
        return BaseImage(name, python or DISTRO_PYTHON["ubuntu-24.04"], glibc="2.39", install_python=True)
    distro = name.removeprefix("docker.io/").removeprefix("library/").split("-slim")[0]
    return BaseImage(name, python or "{}.{}".format(*sys.version_info[:2]), glibc=DISTRO_GLIBC.get(distro, "2.28"))


def parse_probe(name: str, output: str) -> BaseImage:
    """The BaseImage that PROBE's output describes; ValueError when the base cannot run llmctl."""
    facts = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
    glibc = facts.get("glibc", "")
    if not glibc[:1].isdigit():
        raise ValueError(f"base image {name} has no glibc: llmctl needs a glibc Linux (Debian, Ubuntu, ...)")
    if "python" in facts:
        return BaseImage(name, facts["python"], glibc=glibc, arch=facts.get("arch", "x86_64"))
    distro = facts.get("os", "unknown")
    if distro not in DISTRO_PYTHON:
        raise ValueError(f"base image {name} has no python3 and is {distro}, not one of "
                         f"{', '.join(DISTRO_PYTHON)}: use a base with Python >= 3.10")
    return BaseImage(name, DISTRO_PYTHON[distro], glibc=glibc, arch=facts.get("arch", "x86_64"),
                     install_python=True)
