"""Kubernetes manifests for an image: Deployment, Service, HorizontalPodAutoscaler, PodDisruptionBudget.

They match the server: probes on /health and /ready (open without a key), the port the image exposes, and scaling
on `llmctl:num_requests_waiting`, the queue that grows when replicas fall behind. The HPA reads it through
the custom metrics API, so the cluster needs an adapter that serves it (prometheus-adapter, with a rule
that keeps the metric's name). The root filesystem is read-only; /tmp, the one place the server writes
(Triton's cache), is an emptyDir. With a TLS Secret (`kubernetes.io/tls`: tls.crt, tls.key, and ca.crt
for mutual TLS) the server speaks HTTPS from the mounted files and the probes follow; kubelet's probes
show no client certificate, so mutual TLS here is `optional` (a proxy or the app must insist on it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from llmctl.dockerfiles.context import PORT, UID

QUEUE_METRIC = "llmctl:num_requests_waiting"


@dataclass(frozen=True)
class K8sSpec:
    image: str  # NAME:VERSION
    name: str  # DNS-1123 label for every object
    gpus: int = 1
    replicas: int = 1
    max_replicas: int = 4
    queue_target: int = 8  # waiting sequences per pod before the HPA adds one
    cpu: str = "2"
    memory: str = "16Gi"
    api_key_secret: str = ""  # a Secret with key `api-key`; the image never holds one
    tls_secret: str = ""  # a kubernetes.io/tls Secret: serve HTTPS with its tls.crt and tls.key
    client_ca: bool = False  # the TLS Secret's ca.crt checks clients' certificates (mutual TLS, optional)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", self.name):
            raise ValueError(f"Kubernetes names are DNS-1123 labels, got {self.name!r}")
        if self.gpus < 0 or not 1 <= self.replicas <= self.max_replicas:
            raise ValueError(f"need gpus >= 0 and 1 <= replicas <= max_replicas, got {self.gpus}, "
                             f"{self.replicas}, {self.max_replicas}")
        if self.client_ca and not self.tls_secret:
            raise ValueError("client certificates (mutual TLS) need a TLS Secret for the server's own certificate")


def k8s_name(image: str) -> str:
    """The image's repository name as a DNS-1123 label: registry.example/team/My_Model:1 -> my-model."""
    base = image.rpartition(":")[0].rsplit("/", 1)[-1].lower()
    return re.sub(r"[^a-z0-9]+", "-", base).strip("-")[:63].strip("-") or "llmctl"


def manifests(spec: K8sSpec) -> dict[str, dict]:
    """File name -> object."""
    return {"deployment.yaml": deployment(spec), "service.yaml": service(spec),
            "hpa.yaml": autoscaler(spec), "pdb.yaml": disruption_budget(spec)}


def write_manifests(directory: Path, spec: K8sSpec) -> list[Path]:
    import yaml

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, obj in manifests(spec).items():
        path = directory / file_name
        path.write_text(yaml.safe_dump(obj, sort_keys=False))
        written.append(path)
    return written


TLS_DIR = "/etc/llmctl/tls"


def deployment(spec: K8sSpec) -> dict:
    scheme = {"scheme": "HTTPS"} if spec.tls_secret else {}
    health = {"httpGet": {"path": "/health", "port": "http", **scheme}, "timeoutSeconds": 5}
    ready = {"httpGet": {"path": "/ready", "port": "http", **scheme}, "timeoutSeconds": 5}
    resources = {"cpu": spec.cpu, "memory": spec.memory}
    if spec.gpus:
        resources["nvidia.com/gpu"] = str(spec.gpus)  # extended resources: requests must equal limits
    env = [{"name": "LLMCTL_PORT", "value": str(PORT)}]
    if spec.api_key_secret:
        env.append({"name": "LLMCTL_API_KEY", "valueFrom": {
            "secretKeyRef": {"name": spec.api_key_secret, "key": "api-key"}}})
    mounts, volumes = [{"name": "tmp", "mountPath": "/tmp"}], [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}]
    if spec.tls_secret:
        env += [{"name": "LLMCTL_SSL_CERTFILE", "value": f"{TLS_DIR}/tls.crt"},
                {"name": "LLMCTL_SSL_KEYFILE", "value": f"{TLS_DIR}/tls.key"}]
        if spec.client_ca:
            env += [{"name": "LLMCTL_SSL_CA_CERTS", "value": f"{TLS_DIR}/ca.crt"},
                    {"name": "LLMCTL_CLIENT_CERTS", "value": "optional"}]
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
        volumes.append({"name": "tls", "secret": {"secretName": spec.tls_secret, "defaultMode": 0o440}})
    container = {
        "name": "server", "image": spec.image, "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "env": env,
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        # Loading weights and warming up can take minutes; the startup probe holds the others off till then.
        "startupProbe": {**health, "periodSeconds": 10, "failureThreshold": 60},
        # /ready turns 503 as soon as SIGTERM arrives (draining), /health only when a restart would help.
        "readinessProbe": {**ready, "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {**health, "periodSeconds": 15, "failureThreshold": 3},
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID,
                            "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": mounts,
    }
    pod = {
        "metadata": {"labels": _labels(spec), "annotations": {
            "prometheus.io/scrape": "true", "prometheus.io/port": str(PORT), "prometheus.io/path": "/metrics"}},
        "spec": {
            "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "fsGroup": UID,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            # SIGTERM drains in-flight requests (LLMCTL_SHUTDOWN_TIMEOUT, 30 s); leave it room.
            "terminationGracePeriodSeconds": 45,
            "containers": [container],
            "volumes": volumes,
        },
    }
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _metadata(spec),
            "spec": {"replicas": spec.replicas, "selector": {"matchLabels": _selector(spec)}, "template": pod}}


def service(spec: K8sSpec) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _metadata(spec),
            "spec": {"type": "ClusterIP", "selector": _selector(spec),
                     "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}}


def autoscaler(spec: K8sSpec) -> dict:
    metric = {"type": "Pods", "pods": {"metric": {"name": QUEUE_METRIC},
                                       "target": {"type": "AverageValue", "averageValue": str(spec.queue_target)}}}
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": _metadata(spec),
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": spec.name},
                     "minReplicas": spec.replicas, "maxReplicas": spec.max_replicas, "metrics": [metric],
                     # A new replica takes minutes to load its model: scale down slowly, not on one quiet minute.
                     "behavior": {"scaleDown": {"stabilizationWindowSeconds": 600}}}}


def disruption_budget(spec: K8sSpec) -> dict:
    # maxUnavailable, not minAvailable: with one replica, minAvailable 1 would block every node drain.
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _metadata(spec),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _selector(spec)}}}


def _selector(spec: K8sSpec) -> dict:
    return {"app.kubernetes.io/name": spec.name}


def _labels(spec: K8sSpec) -> dict:
    version = re.sub(r"[^A-Za-z0-9_.-]", "-", spec.image.rpartition(":")[2])[:63].strip("-_.") or "unknown"
    return {**_selector(spec), "app.kubernetes.io/version": version, "app.kubernetes.io/managed-by": "llmctl"}


def _metadata(spec: K8sSpec) -> dict:
    return {"name": spec.name, "labels": _labels(spec)}
