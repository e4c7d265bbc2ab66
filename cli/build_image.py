"""`llmctl build-image`: a container image that serves one model, and the manifests to run it."""

from __future__ import annotations

import tempfile
from pathlib import Path

import typer

from llmctl.cli.console import console, fail
from llmctl.cli.serve import REFERENCE_MODEL_NAME


def build_image(
    model: str = typer.Argument(None, help="Model directory (default: the embedded reference model).",
                                show_default=False),
    tag: str = typer.Option(..., "--tag", "-t", help="Image name and version, NAME:VERSION."),
    base: str = typer.Option(None, "--base", show_default=False,
                             help="Base image, already in the engine's local images (default: a CUDA runtime, "
                                  "nvidia/cuda:13.0.1-runtime-ubuntu24.04, whose CUDA matches torch's default "
                                  "wheels; a CUDA base must match the wheels' CUDA)."),
    context_only: Path = typer.Option(None, "--context-only", file_okay=False, show_default=False,
                                      help="Write the Dockerfile and build context to this directory; "
                                           "build nothing, need no engine."),
    k8s: Path = typer.Option(None, "--k8s", file_okay=False, show_default=False,
                             help="Also write Kubernetes manifests (Deployment, Service, HPA, PDB) here."),
    gpus: int = typer.Option(1, "--gpus", min=0, help="GPUs each pod asks for in the manifests."),
    tls_secret: str = typer.Option(None, "--k8s-tls-secret", show_default=False,
                                   help="Serve HTTPS in the manifests with this kubernetes.io/tls Secret's "
                                        "tls.crt and tls.key, mounted read-only."),
    client_ca: bool = typer.Option(False, "--k8s-client-ca",
                                   help="Also check client certificates against the TLS Secret's ca.crt."),
    python_version: str = typer.Option(None, "--python-version", show_default=False,
                                       help="The base's Python, X.Y, for --context-only (with an engine "
                                            "it is read from the base)."),
    wheelhouse: Path = typer.Option(None, "--wheelhouse", file_okay=False, show_default=False,
                                    help="Keep the wheels here and reuse them in later builds (delete the "
                                         "directory to pick up new code or dependencies)."),
    constraints: Path = typer.Option(None, "--constraints", "-c", exists=True, dir_okay=False,
                                     show_default=False,
                                     help="pip constraints for the wheelhouse (e.g. constraints-cpu.txt "
                                          "for a CPU base's torch)."),
) -> None:
    """Build a non-root image that runs `llmctl serve` on MODEL, through the engine DOCKER_HOST names."""
    from llmctl.dockerfiles import base as bases
    from llmctl.dockerfiles.context import ImageSpec, parse_tag, write_context
    from llmctl.dockerfiles.engine import EngineError
    from llmctl.dockerfiles.k8s import K8sSpec, k8s_name
    from llmctl.dockerfiles.model import inspect_model
    from llmctl.dockerfiles.wheelhouse import WheelhouseError, build_wheelhouse, reuse_wheelhouse
    from llmctl.reference import default_model_path

    base_name = base or bases.DEFAULT_BASE
    try:
        name, version = parse_tag(tag)
        info = inspect_model(model or default_model_path(), None if model else REFERENCE_MODEL_NAME)
        client = None
        if context_only is None:
            from llmctl.dockerfiles.engine import connect, probe_base

            client = connect()
            base_image = probe_base(client, base_name)
        else:
            base_image = bases.assumed_base(base_name, python_version)
        if k8s is not None:
            _write_k8s(k8s, K8sSpec(image=tag, name=k8s_name(tag), gpus=gpus, tls_secret=tls_secret or "",
                                    client_ca=client_ca))
        with tempfile.TemporaryDirectory(prefix="llmctl-image-") as scratch:
            context = context_only or Path(scratch)
            with console.status(f"fetching wheels for Python {base_image.python} ({base_image.arch})"):
                if wheelhouse is None:
                    llmctl_wheel, pip_wheel = build_wheelhouse(context / "wheels", base_image, constraints)
                else:
                    llmctl_wheel, pip_wheel = reuse_wheelhouse(wheelhouse, context / "wheels", base_image,
                                                               constraints)
            from llmctl.dockerfiles.cuda import check_base, driver_requirement, wheels_cuda

            cuda = wheels_cuda(context / "wheels")
            check_base(base_name, cuda)
            console.print(f"the image needs {driver_requirement(cuda)}")
            spec = ImageSpec(name, version, base_image, info, llmctl_wheel, pip_wheel, cuda=cuda)
            dockerfile = write_context(context, spec)
            if client is None:
                console.print(f"wrote {dockerfile} and its context; build it with `docker build {context}`")
                return
            _build(client, context, spec)
    except (ValueError, EngineError, WheelhouseError) as exc:
        fail(str(exc))


def _build(client, context: Path, spec) -> None:
    from llmctl.dockerfiles.build import build_image as build

    # Only a base without Python needs the network, for its distribution's python3 package.
    result = build(client, context, spec.tag, console, network=None if spec.base.install_python else "none")
    size = client.images.get(result.image_id).attrs["Size"] / 1e9
    cached = sum(result.cached)
    console.print(f"built {spec.tag} ({result.image_id[7:19]}): {size:.2f} GB, {result.seconds:.1f} s, "
                  f"{cached} of {len(result.steps)} steps cached; model sha256 {spec.model.sha256[:12]}")


def _write_k8s(directory: Path, spec) -> None:
    from llmctl.dockerfiles.k8s import write_manifests

    written = write_manifests(directory, spec)
    console.print(f"wrote {', '.join(p.name for p in written)} to {directory}")
