"""`llmctl build-image`: a container image that serves one model, and the manifests to run it."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import typer

from llmctl.cli.console import console, emit, fail, start_output
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
                             help="Also write Kubernetes manifests here: `kubectl apply -k DIR` deploys them "
                                  "(kustomization.yaml); beside them a KServe InferenceService and the "
                                  "prometheus-adapter rule the HPA needs."),
    gpus: int = typer.Option(1, "--gpus", min=0, help="GPUs each pod asks for in the manifests."),
    k8s_namespace: str = typer.Option(None, "--k8s-namespace", show_default=False,
                                      help="Namespace of every object (default: kubectl's current one)."),
    k8s_replicas: int = typer.Option(None, "--k8s-replicas", show_default=False,
                                     help="Replicas, and the autoscaler's floor (default: 1); from 2 on, a "
                                          "PodDisruptionBudget lets one go at a time."),
    k8s_max_replicas: int = typer.Option(None, "--k8s-max-replicas", show_default=False,
                                         help="The autoscaler's ceiling; equal to --k8s-replicas for no "
                                              "autoscaler (default: 4)."),
    k8s_cpu: str = typer.Option(None, "--k8s-cpu", show_default=False,
                                help="CPU each pod asks for and is limited to (default: 2)."),
    k8s_memory: str = typer.Option(None, "--k8s-memory", show_default=False,
                                   help="Memory each pod asks for and is limited to (default: 16Gi)."),
    k8s_node_selector: list[str] = typer.Option(None, "--k8s-node-selector", show_default=False,
                                                metavar="KEY=VALUE",
                                                help="Run only on nodes with this label (repeatable)."),
    k8s_toleration: list[str] = typer.Option(None, "--k8s-toleration", show_default=False,
                                             metavar="KEY[=VALUE]:EFFECT",
                                             help="Tolerate this taint (KEY:EFFECT: with any value), e.g. "
                                                  "nvidia.com/gpu:NoSchedule (repeatable)."),
    k8s_api_key_secret: str = typer.Option(None, "--k8s-api-key-secret", show_default=False,
                                           help="Require API keys, read from this Secret's key `api-key` (one "
                                                "key per line), mounted as a file."),
    tls_secret: str = typer.Option(None, "--k8s-tls-secret", show_default=False,
                                   help="Serve HTTPS in the manifests with this kubernetes.io/tls Secret's "
                                        "tls.crt and tls.key, mounted read-only."),
    client_ca: bool = typer.Option(False, "--k8s-client-ca",
                                   help="Also check client certificates against the TLS Secret's ca.crt."),
    k8s_model_pvc: str = typer.Option(None, "--k8s-model-pvc", show_default=False,
                                      help="Serve the model on this PersistentVolumeClaim, mounted read-only, "
                                           "instead of the baked one."),
    k8s_model_path: str = typer.Option(None, "--k8s-model-path", show_default=False,
                                       help="The model's directory inside that claim (its name is the served "
                                            "model's; default: the claim's root, served as the claim's name)."),
    k8s_no_service_monitor: bool = typer.Option(False, "--k8s-no-service-monitor",
                                                help="Leave the ServiceMonitor out (a cluster without "
                                                     "prometheus-operator's CRDs would refuse it)."),
    k8s_ingress_host: str = typer.Option(None, "--k8s-ingress-host", show_default=False,
                                         help="Also write an Ingress for this host."),
    k8s_ingress_tls_secret: str = typer.Option(None, "--k8s-ingress-tls-secret", show_default=False,
                                               help="The Ingress terminates TLS with this kubernetes.io/tls "
                                                    "Secret."),
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
    kernel_configs: list[Path] = typer.Option(None, "--kernel-configs", exists=True, dir_okay=False,
                                              show_default=False,
                                              help="A W4A16 tuned file (`llmctl bench kernels --tune --save`) "
                                                   "to bake in, so pods on that GPU skip kernel tuning at start-up "
                                                   "(repeat for several GPUs)."),
    output: str = typer.Option("text", "--output", help="text, or json: the image (id, size, CUDA, driver "
                                                        "needed, build time) and the files written, as one "
                                                        "document."),
) -> None:
    """Build a non-root image that runs `llmctl serve` on MODEL, through the engine DOCKER_HOST names."""
    start_output(output)
    from llmctl.dockerfiles import base as bases
    from llmctl.dockerfiles.context import ImageSpec, parse_tag, write_context
    from llmctl.dockerfiles.engine import EngineError
    from llmctl.dockerfiles.model import inspect_model
    from llmctl.dockerfiles.wheelhouse import WheelhouseError, build_wheelhouse, reuse_wheelhouse
    from llmctl.dockerfiles.wheelhouse import summary as wheel_summary
    from llmctl.reference import default_model_path

    base_name = base or bases.DEFAULT_BASE
    try:
        name, version = parse_tag(tag)
        info = inspect_model(model or default_model_path(), None if model else REFERENCE_MODEL_NAME)
        tuned = _tuned_files(kernel_configs or [])
        # Checked before the engine is asked anything: a bad --k8s-* value is a mistake of its own.
        k8s_spec = _k8s_spec(k8s, tag, gpus, namespace=k8s_namespace, replicas=k8s_replicas,
                             max_replicas=k8s_max_replicas, cpu=k8s_cpu, memory=k8s_memory,
                             node_selector=k8s_node_selector, toleration=k8s_toleration,
                             api_key_secret=k8s_api_key_secret, tls_secret=tls_secret, client_ca=client_ca,
                             model_pvc=k8s_model_pvc, model_path=k8s_model_path, ingress_host=k8s_ingress_host,
                             ingress_tls_secret=k8s_ingress_tls_secret, no_service_monitor=k8s_no_service_monitor)
        client = None
        if context_only is None:
            from llmctl.dockerfiles.engine import connect, probe_base

            client = connect()
            base_image = probe_base(client, base_name)
        else:
            base_image = bases.assumed_base(base_name, python_version)
        result: dict = {"tag": tag}  # --output json's document
        result["k8s"] = _write_k8s(k8s, k8s_spec)
        with tempfile.TemporaryDirectory(prefix="llmctl-image-") as scratch:
            context = context_only or Path(scratch)
            what = f"fetching wheels for Python {base_image.python} ({base_image.arch})"
            started = time.perf_counter()
            with console.status(what) as status:
                def progress(note: str) -> None:
                    status.update(f"{what}: {note}")

                if wheelhouse is None:
                    llmctl_wheel, pip_wheel = build_wheelhouse(context / "wheels", base_image, constraints,
                                                               on_progress=progress)
                else:
                    llmctl_wheel, pip_wheel = reuse_wheelhouse(wheelhouse, context / "wheels", base_image,
                                                               constraints, on_progress=progress)
            console.info(f"wheels: {wheel_summary(context / 'wheels')} in {time.perf_counter() - started:.0f} s")
            from llmctl.dockerfiles.cuda import check_base, driver_requirement, wheels_cuda

            cuda = wheels_cuda(context / "wheels")
            check_base(base_name, cuda)
            result.update(cuda=cuda, requires=driver_requirement(cuda), model_sha256=info.sha256)
            _say(f"the image needs {result['requires']}")
            spec = ImageSpec(name, version, base_image, info, llmctl_wheel, pip_wheel, cuda=cuda, kernel_configs=tuned)
            dockerfile = write_context(context, spec)
            if client is None:
                result["context"] = str(context)
                _say(f"wrote {dockerfile} and its context; build it with `docker build {context}`")
            else:
                result.update(_build(client, context, spec))
    except (ValueError, EngineError, WheelhouseError) as exc:
        fail(str(exc))
    if console.json:
        emit(result)


def _tuned_files(paths: list[Path]) -> tuple[tuple[Path, str], ...]:
    """(file, GPU) of each --kernel-configs file, read as the runtime will read it: a file it would refuse
    is refused now, not in every pod."""
    if not paths:
        return ()
    from llmctl.runtime.kernels.w4a16 import configs

    out = []
    for path in paths:
        gpu, version, _ = configs.read_tuned(path)
        if version != configs.KERNELS_VERSION:
            raise ValueError(f"{path} was tuned for W4A16 kernels version {version}, this llmctl's are "
                             f"{configs.KERNELS_VERSION}: make it again with `llmctl bench kernels --tune --save`")
        out.append((path, gpu))
    return tuple(out)


def _say(line: str) -> None:
    """A result line in text mode; --output json has it in the document instead."""
    if not console.json:
        console.print(line)


def _build(client, context: Path, spec) -> dict:
    from llmctl.dockerfiles.build import build_image as build

    # Only a base without Python needs the network, for its distribution's python3 package.
    result = build(client, context, spec.tag, console, network=None if spec.base.install_python else "none")
    size = client.images.get(result.image_id).attrs["Size"]
    cached = sum(result.cached)
    _say(f"built {spec.tag} ({result.image_id[7:19]}): {size / 1e9:.2f} GB, {result.seconds:.1f} s, "
         f"{cached} of {len(result.steps)} steps cached; model sha256 {spec.model.sha256[:12]}")
    return {"image_id": result.image_id, "size_bytes": size, "seconds": round(result.seconds, 1),
            "steps": len(result.steps), "cached_steps": cached}


def _k8s_spec(directory: Path | None, image: str, gpus: int, **options):
    """The K8sSpec of the --k8s-* options given (keyword: the flag's name after --k8s-; the others keep
    K8sSpec's defaults), None without --k8s. Without --k8s, a --k8s-* option is a mistake, not ignored."""
    given = {key: value for key, value in options.items() if value not in (None, [], ()) and value is not False}
    if directory is None:
        if given:
            raise ValueError(f"--k8s-{next(iter(given)).replace('_', '-')} needs --k8s DIR")
        return None
    from llmctl.dockerfiles.k8s import spec_from_options

    return spec_from_options(image, gpus, **given)


def _write_k8s(directory: Path | None, spec) -> list[str]:
    if directory is None:
        return []
    from llmctl.dockerfiles.k8s import write_manifests

    written = write_manifests(directory, spec)
    _say(f"wrote {', '.join(p.name for p in written)} to {directory}")
    return [str(p) for p in written]
