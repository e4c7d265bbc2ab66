"""Kubernetes manifests for an image: `kubectl apply -k DIR` deploys it, with what production needs around it.

kustomization.yaml lists the objects (and sets the namespace): a Deployment (k8s_pod: probes on /health and
/ready, read-only root with emptyDirs for what the server writes, preStop before the drain, the model baked
or on a claim, secrets as files), its Service and NetworkPolicy, a ServiceMonitor for /metrics; with room to
scale, an HPA on the queue (k8s_metrics); with two replicas or more, a PodDisruptionBudget; with a host, an
Ingress. Beside them, not listed: the prometheus-adapter rule the HPA needs (Helm values), and a KServe
InferenceService, the alternative path (k8s_kserve). Each such file says at its top what it is for.

With a TLS Secret (`kubernetes.io/tls`: tls.crt, tls.key, and ca.crt for mutual TLS) the server speaks HTTPS
from the mounted files and the probes follow; kubelet's probes show no client certificate, so mutual TLS
here is `optional` (a proxy or the app must insist on it).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from llmctl.dockerfiles.k8s_kserve import inference_service, kserve_header
from llmctl.dockerfiles.k8s_metrics import (
    QUEUE_METRIC,
    adapter_header,
    adapter_rules,
    autoscaler,
    service_monitor,
)
from llmctl.dockerfiles.k8s_objects import deployment, disruption_budget, ingress, network_policy, service
from llmctl.dockerfiles.k8s_spec import K8sSpec, Toleration, k8s_name, spec_from_options

__all__ = ["QUEUE_METRIC", "K8sSpec", "Toleration", "k8s_name", "manifests", "resources", "spec_from_options",
           "write_manifests"]

KUSTOMIZATION = "kustomization.yaml"
ADAPTER_RULES = "prometheus-adapter-rules.yaml"
INFERENCE_SERVICE = "inferenceservice.yaml"
RESOURCES: dict[str, Callable[[K8sSpec], dict | None]] = {
    "deployment.yaml": deployment, "service.yaml": service, "networkpolicy.yaml": network_policy,
    "servicemonitor.yaml": service_monitor, "hpa.yaml": autoscaler, "pdb.yaml": disruption_budget,
    "ingress.yaml": ingress,
}


def resources(spec: K8sSpec) -> dict[str, dict]:
    """The Kubernetes objects that kustomization.yaml lists, by file name (those the spec calls for)."""
    made = {file_name: make(spec) for file_name, make in RESOURCES.items()}
    return {file_name: obj for file_name, obj in made.items() if obj is not None}


def manifests(spec: K8sSpec) -> dict[str, dict]:
    """Every file `--k8s DIR` writes, by name: the resources, their kustomization, and the files beside it."""
    listed = resources(spec)
    files = {**listed, KUSTOMIZATION: kustomization(spec, list(listed)), INFERENCE_SERVICE: inference_service(spec)}
    rules = adapter_rules(spec)
    return files if rules is None else {**files, ADAPTER_RULES: rules}


def kustomization(spec: K8sSpec, file_names: list[str]) -> dict:
    namespace = {"namespace": spec.namespace} if spec.namespace else {}
    return {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", **namespace,
            "resources": file_names}


def headers(spec: K8sSpec) -> dict[str, str]:
    """The comment each file starts with, where the file needs one."""
    return {KUSTOMIZATION: f"# `kubectl apply -k` on this directory deploys {spec.image} as {spec.name}; "
                           f"`kubectl kustomize` shows what it applies.\n",
            ADAPTER_RULES: adapter_header(spec), INFERENCE_SERVICE: kserve_header(spec)}


def write_manifests(directory: Path, spec: K8sSpec) -> list[Path]:
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data) -> bool:
            return True  # each object spelled out: with &id001 / *id001, editing one place would change two

    directory.mkdir(parents=True, exist_ok=True)
    comments = headers(spec)
    written = []
    for file_name, obj in manifests(spec).items():
        path = directory / file_name
        path.write_text(comments.get(file_name, "") + yaml.dump(obj, Dumper=Dumper, sort_keys=False))
        written.append(path)
    return written
