"""Sessions: tests (the CI gate), slow and image (long end-to-end ones, also in CI), lint, demo (the main
job on the embedded model), reference (retrain it)."""

from __future__ import annotations

import os
import shutil

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.default_venv_backend = "venv"

# CPU machines get the CPU build of torch; on a CUDA machine set LLMCTL_TORCH_CONSTRAINTS="" to keep yours.
CONSTRAINTS = os.environ.get("LLMCTL_TORCH_CONSTRAINTS", "constraints-cpu.txt")


def install(session: nox.Session, extras: str) -> None:
    args = ["-c", CONSTRAINTS] if CONSTRAINTS else []
    session.install(*args, "-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """The default suite: CPU only, Triton kernels under the interpreter, GPU-only tests skipped.
    GPTQModel and AutoAWQ are installed so that the checkpoint interop tests run against them."""
    install(session, "test,serve,bench,quantize-peers")
    session.run("pytest", "-m", "not slow", "-q", *session.posargs, env={"OMP_NUM_THREADS": "2"})


@nox.session
def slow(session: nox.Session) -> None:
    """Long end-to-end sessions (the 2,000-request soak, bench against `transformers serve`, the peers
    quantizing, ...)."""
    install(session, "test,serve,bench,quantize-peers")
    session.install(*(["-c", CONSTRAINTS] if CONSTRAINTS else []), "transformers[serving]")
    session.run("pytest", "-m", "slow", "-q", *session.posargs, env={"OMP_NUM_THREADS": "2"})


@nox.session
def image(session: nox.Session) -> None:
    """build-image end to end on a dockerd the test starts and stops (needs root; installs docker.io, debootstrap)."""
    if not (shutil.which("dockerd") and shutil.which("debootstrap")):
        session.run("apt-get", "update", "-q", external=True)
        session.run("apt-get", "install", "-y", "-q", "docker.io", "debootstrap", external=True)
    install(session, "test,serve,image")
    session.run("pytest", "-m", "docker", "-q", "tests/image", *session.posargs, env={"OMP_NUM_THREADS": "2"})


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session
def demo(session: nox.Session) -> None:
    """The whole pipeline on the embedded reference model: quantize, generate, build-image (or its context
    where no Docker engine answers), serve, bench (scripts/demo.py)."""
    install(session, "serve,bench,image")
    session.run("python", "scripts/demo.py", *session.posargs)


@nox.session
def reference(session: nox.Session) -> None:
    """Retrain the embedded reference model (GPU recommended; see reference/train.py for the recipe)."""
    install(session, "train")
    session.run("python", "-m", "llmctl.reference.train", "--out", "reference/model", *session.posargs)
