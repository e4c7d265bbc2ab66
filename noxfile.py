"""Sessions: tests (the CI gate), lint, demo (the main job on the embedded model), reference (retrain it)."""

from __future__ import annotations

import os

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
    """Long end-to-end sessions (the 2,000-request soak, bench against `transformers serve`, ...)."""
    install(session, "test,serve,bench")
    session.install(*(["-c", CONSTRAINTS] if CONSTRAINTS else []), "transformers[serving]")
    session.run("pytest", "-m", "slow", "-q", *session.posargs, env={"OMP_NUM_THREADS": "2"})


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session
def demo(session: nox.Session) -> None:
    """Run llmctl on the embedded reference model, end to end."""
    install(session, "serve")
    session.run("llmctl", "--version")
    session.run("llmctl", "generate", "--max-tokens", "80", "--prompt", "def read_config(path):")


@nox.session
def reference(session: nox.Session) -> None:
    """Retrain the embedded reference model (GPU recommended; see reference/train.py for the recipe)."""
    install(session, "train")
    session.run("python", "-m", "llmctl.reference.train", "--out", "reference/model", *session.posargs)
