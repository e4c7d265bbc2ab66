"""The core objects: Deployment, Service, PodDisruptionBudget, NetworkPolicy and an optional Ingress."""

from __future__ import annotations

from llmctl.dockerfiles.context import PORT
from llmctl.dockerfiles.k8s_pod import pod_spec
from llmctl.dockerfiles.k8s_spec import K8sSpec

MAX_BODY = "8m"  # nginx's default is 1m; the server takes up to LLMCTL_MAX_BODY_BYTES, 8 MiB by default
STREAM_TIMEOUT_SECONDS = 600  # a long generation streams for minutes; nginx's default cuts it at 60 s


def deployment(spec: K8sSpec) -> dict:
    template = {"metadata": {"labels": spec.labels(), "annotations": {
        "prometheus.io/scrape": "true", "prometheus.io/port": str(PORT), "prometheus.io/path": "/metrics"}},
        "spec": pod_spec(spec)}
    body = {
        # A rollout adds a pod before it takes one away, so it never lowers capacity (it needs room for one).
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        # The startup probe alone allows 10 minutes, and pulling a multi-GB image comes before it.
        "progressDeadlineSeconds": 1800,
        "selector": {"matchLabels": spec.selector()},
        "template": template,
    }
    if not spec.autoscaled:  # with an HPA, a replica count here would reset its choice on every apply
        body = {"replicas": spec.replicas, **body}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": spec.metadata(), "spec": body}


def service(spec: K8sSpec) -> dict:
    port = {"name": spec.port_name, "port": 443 if spec.tls_secret else 80, "targetPort": spec.port_name}
    return {"apiVersion": "v1", "kind": "Service", "metadata": spec.metadata(),
            "spec": {"type": "ClusterIP", "selector": spec.selector(), "ports": [{**port, "protocol": "TCP"}]}}


def disruption_budget(spec: K8sSpec) -> dict | None:
    """One pod at a time may be evicted, and only where that leaves one serving: none below two replicas,
    where any budget either protects nothing or blocks every node drain."""
    if spec.replicas < 2:
        return None
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": spec.metadata(),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": spec.selector()},
                     # A pod that is not ready serves nobody: evicting it must not wait for the budget.
                     "unhealthyPodEvictionPolicy": "AlwaysAllow"}}


def network_policy(spec: K8sSpec) -> dict:
    """Ingress to the server's port alone (the API, the probes and /metrics all live there)."""
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": spec.metadata(),
            "spec": {"podSelector": {"matchLabels": spec.selector()}, "policyTypes": ["Ingress"],
                     "ingress": [{"ports": [{"protocol": "TCP", "port": PORT}]}]}}


def ingress(spec: K8sSpec) -> dict | None:
    if not spec.ingress_host:
        return None
    nginx = "nginx.ingress.kubernetes.io"
    annotations = {f"{nginx}/proxy-buffering": "off",  # server-sent events must reach the client as they come
                   f"{nginx}/proxy-read-timeout": str(STREAM_TIMEOUT_SECONDS),
                   f"{nginx}/proxy-send-timeout": str(STREAM_TIMEOUT_SECONDS),
                   f"{nginx}/proxy-body-size": MAX_BODY}
    if spec.tls_secret:
        annotations[f"{nginx}/backend-protocol"] = "HTTPS"
    backend = {"service": {"name": spec.name, "port": {"name": spec.port_name}}}
    body = {"rules": [{"host": spec.ingress_host,
                       "http": {"paths": [{"path": "/", "pathType": "Prefix", "backend": backend}]}}]}
    if spec.ingress_tls_secret:
        body = {"tls": [{"hosts": [spec.ingress_host], "secretName": spec.ingress_tls_secret}], **body}
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": spec.metadata(annotations=annotations), "spec": body}
