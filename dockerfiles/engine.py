"""The Docker engine that DOCKER_HOST names, reached through the docker SDK, and what it says of a base."""

from __future__ import annotations

import os

from llmctl.dockerfiles.base import PROBE, BaseImage, parse_probe


class EngineError(RuntimeError):
    """The engine is unreachable, or refused what we asked; the message is one line for the user."""


def connect():
    """A client for the engine at DOCKER_HOST (or the default socket), checked with a ping."""
    try:
        import docker
    except ImportError as exc:
        raise EngineError("the docker SDK is missing: pip install 'llmctl[image]'") from exc
    where = os.environ.get("DOCKER_HOST") or "the default socket (unix:///var/run/docker.sock)"
    try:
        client = docker.from_env(timeout=600)
        client.ping()
    except Exception as exc:  # the SDK raises DockerException, requests' and urllib3's errors alike
        raise EngineError(f"no Docker engine reachable at {where}: {_first_line(exc)}") from exc
    return client


def probe_base(client, name: str) -> BaseImage:
    """Run PROBE in the base, offline and removed afterwards. The base must already be local: the build
    never pulls (so that what it builds on is what you chose to pull)."""
    import docker.errors

    try:
        client.images.get(name)
    except docker.errors.ImageNotFound:
        raise EngineError(f"base image {name} is not in the engine's local images: "
                          f"`docker pull {name}` first (build-image never pulls)") from None
    try:
        output = client.containers.run(name, [PROBE], entrypoint=["sh", "-c"], user="0", network_mode="none",
                                       remove=True, stdout=True, stderr=False)
    except docker.errors.DockerException as exc:
        raise EngineError(f"cannot run `sh` in base image {name}: {_first_line(exc)}") from exc
    try:
        return parse_probe(name, output.decode(errors="replace"))
    except ValueError as exc:
        raise EngineError(str(exc)) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
