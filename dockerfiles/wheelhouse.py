"""The wheelhouse: every wheel the image installs, fetched on the host for the base's Python and glibc.

The host has the network (or the pip index, find-links and constraints that pip's config names), the
build has none. The llmctl wheel is built from the source tree when there is one, with a fixed
SOURCE_DATE_EPOCH so that rebuilding it from the same sources gives the same bytes and the image's
dependency layer stays cached.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import llmctl
from llmctl.dockerfiles.base import BaseImage

SOURCE_DATE_EPOCH = "1700000000"
OLDEST_MANYLINUX = 17  # manylinux2014; older glibc than that has no torch wheels anyway


class WheelhouseError(RuntimeError):
    """pip could not fetch or build a wheel; the message is pip's last error line."""


def build_wheelhouse(dest: Path, base: BaseImage, constraints: Path | None = None) -> tuple[str, str]:
    """Fill `dest` with llmctl[serve]'s wheels and pip's own; returns (llmctl wheel, pip wheel) names."""
    dest.mkdir(parents=True, exist_ok=True)
    llmctl_wheel = _llmctl_wheel(dest)
    target = ["--only-binary=:all:", "--python-version", base.python, "--implementation", "cp",
              *_flags("--abi", ["cp" + base.python.replace(".", ""), "abi3", "none"]),
              *_flags("--platform", platforms(base.glibc, base.arch))]
    extra = ["-c", str(constraints)] if constraints else []
    _pip("download", "--dest", str(dest), *target, *extra, f"{dest / llmctl_wheel}[serve]", "pip")
    return llmctl_wheel, _one(dest, "pip-*.whl")


def reuse_wheelhouse(cache: Path, dest: Path, base: BaseImage, constraints: Path | None = None) -> tuple[str, str]:
    """Fill `cache` once (for this base's Python, glibc and arch), then link its wheels into `dest`.

    A cache is the way to build several images from the same wheels: neither pip nor a concurrent edit
    of the source tree can then change the dependency layer. Delete the cache to pick up new code.
    """
    key = {"python": base.python, "glibc": base.glibc, "arch": base.arch,
           "constraints": constraints.read_text() if constraints else ""}
    stamp = cache / "wheelhouse.json"
    if not stamp.is_file():
        build_wheelhouse(cache, base, constraints)
        stamp.write_text(json.dumps(key, indent=1))
    elif json.loads(stamp.read_text()) != key:
        raise WheelhouseError(f"wheelhouse {cache} was made for another base or constraints "
                              f"({stamp.read_text()!r:.120}); use another directory")
    dest.mkdir(parents=True, exist_ok=True)
    for wheel in cache.glob("*.whl"):
        try:
            os.link(wheel, dest / wheel.name)
        except OSError:  # another filesystem
            shutil.copyfile(wheel, dest / wheel.name)
    return _one(dest, "llmctl-*.whl"), _one(dest, "pip-*.whl")


def platforms(glibc: str, arch: str) -> list[str]:
    """manylinux tags a wheel may carry to run on this glibc (pip does not widen --platform itself)."""
    newest = int(glibc.split(".")[1])
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(newest, OLDEST_MANYLINUX - 1, -1)]
    return [*tags, f"manylinux2014_{arch}", "any"]


def source_tree() -> Path | None:
    """The checkout llmctl runs from (an editable install), or None for an installed wheel."""
    root = Path(llmctl.__file__).resolve().parents[1]
    pyproject = root / "pyproject.toml"
    return root if pyproject.is_file() and 'name = "llmctl"' in pyproject.read_text() else None


def _llmctl_wheel(dest: Path) -> str:
    root = source_tree()
    if root is None:
        _pip("download", "--no-deps", "--dest", str(dest), f"llmctl=={llmctl.__version__}")
    else:
        _pip("wheel", "--no-deps", "--wheel-dir", str(dest), str(root))
    return _one(dest, "llmctl-*.whl")


def _pip(*args: str) -> None:
    env = {**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run([sys.executable, "-m", "pip", *args, "--quiet"], env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode:
        errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")] or \
                 done.stderr.strip().splitlines()[-1:] or ["no output"]
        raise WheelhouseError(f"pip {args[0]} failed: {errors[0].removeprefix('ERROR: ')}")


def _flags(flag: str, values: list[str]) -> list[str]:
    return [part for value in values for part in (flag, value)]


def _one(dest: Path, pattern: str) -> str:
    found = sorted(dest.glob(pattern))
    if len(found) != 1:
        raise WheelhouseError(f"expected one {pattern} in {dest}, found {len(found)}")
    return found[0].name
