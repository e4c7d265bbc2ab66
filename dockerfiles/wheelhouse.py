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
import threading
from collections.abc import Callable
from pathlib import Path

import llmctl
from llmctl.dockerfiles.base import BaseImage

SOURCE_DATE_EPOCH = "1700000000"
OLDEST_MANYLINUX = 17  # manylinux2014; older glibc than that has no torch wheels anyway


class WheelhouseError(RuntimeError):
    """pip could not fetch or build a wheel; the message is pip's last error line."""


def build_wheelhouse(dest: Path, base: BaseImage, constraints: Path | None = None,
                     on_progress: Callable[[str], None] | None = None) -> tuple[str, str]:
    """Fill `dest` with llmctl[serve]'s wheels and pip's own; returns (llmctl wheel, pip wheel) names.
    on_progress hears a short line as pip resolves and downloads each package."""
    dest.mkdir(parents=True, exist_ok=True)
    llmctl_wheel = _llmctl_wheel(dest)
    target = ["--only-binary=:all:", "--python-version", base.python, "--implementation", "cp",
              *_flags("--abi", ["cp" + base.python.replace(".", ""), "abi3", "none"]),
              *_flags("--platform", platforms(base.glibc, base.arch))]
    extra = ["-c", str(constraints)] if constraints else []
    _pip("download", "--dest", str(dest), *target, *extra, f"{dest / llmctl_wheel}[serve]", "pip",
         on_line=_progress_notes(on_progress) if on_progress else None)
    return llmctl_wheel, _one(dest, "pip-*.whl")


def summary(dest: Path) -> str:
    """What the wheelhouse holds, in a few words: "61 wheels, 2.9 GB"."""
    wheels = list(dest.glob("*.whl"))
    return f"{len(wheels)} wheels, {sum(w.stat().st_size for w in wheels) / 1e9:.1f} GB"


def _progress_notes(on_progress: Callable[[str], None]) -> Callable[[str], None]:
    """pip's output lines -> "12 packages: downloading torch-2.13.0-...whl (900.1 MB)"."""
    seen = {"packages": 0}

    def on_line(line: str) -> None:
        line = line.strip()
        if line.startswith("Collecting "):
            seen["packages"] += 1
            on_progress(f"{seen['packages']} packages: resolving {line.split()[1]}")
        elif line.startswith(("Downloading ", "File was already downloaded ")):
            on_progress(f"{seen['packages']} packages: {line[0].lower()}{line[1:]}"[:160])

    return on_line


def reuse_wheelhouse(cache: Path, dest: Path, base: BaseImage, constraints: Path | None = None,
                     on_progress: Callable[[str], None] | None = None) -> tuple[str, str]:
    """Fill `cache` once (for this base's Python, glibc and arch), then link its wheels into `dest`.

    A cache is the way to build several images from the same wheels: neither pip nor a concurrent edit
    of the source tree can then change the dependency layer. Delete the cache to pick up new code.
    """
    key = {"python": base.python, "glibc": base.glibc, "arch": base.arch,
           "constraints": constraints.read_text() if constraints else ""}
    stamp = cache / "wheelhouse.json"
    if not stamp.is_file():
        build_wheelhouse(cache, base, constraints, on_progress)
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


def _pip(*args: str, on_line: Callable[[str], None] | None = None) -> None:
    """Run pip; with on_line, its stdout line by line as it comes (progress bars off)."""
    env = {**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    bars = ["--progress-bar", "off"] if args[0] in ("download", "wheel") else []
    verbosity = bars if on_line else ["--quiet"]
    with subprocess.Popen([sys.executable, "-m", "pip", *args, *verbosity], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        stderr: list[str] = []
        reader = threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)
        reader.start()
        for line in proc.stdout:
            if on_line:
                on_line(line)
        reader.join()
    if proc.returncode:
        text = "".join(stderr)
        errors = [line for line in text.splitlines() if line.startswith("ERROR")] or \
                 text.strip().splitlines()[-1:] or ["no output"]
        raise WheelhouseError(f"pip {args[0]} failed: {errors[0].removeprefix('ERROR: ')}")


def _flags(flag: str, values: list[str]) -> list[str]:
    return [part for value in values for part in (flag, value)]


def _one(dest: Path, pattern: str) -> str:
    found = sorted(dest.glob(pattern))
    if len(found) != 1:
        raise WheelhouseError(f"expected one {pattern} in {dest}, found {len(found)}")
    return found[0].name
