"""Kubernetes manifests: valid against the bundled Kubernetes schemas (offline), and matched to the server."""

from __future__ import annotations

import inspect

import pytest
import yaml

from llmctl.dockerfiles.context import PORT, UID
from llmctl.dockerfiles.k8s import QUEUE_METRIC, K8sSpec, k8s_name, manifests, write_manifests

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
SPEC = K8sSpec(image="registry.example:5000/team/tiny-gptq:2026.11.21", name="tiny-gptq")


def _validate(obj: dict) -> None:
    kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)


def test_written_manifests_are_valid_kubernetes(tmp_path):
    written = write_manifests(tmp_path, SPEC)
    assert [p.name for p in written] == ["deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml"]
    kinds = []
    for path in written:
        obj = yaml.safe_load(path.read_text())
        _validate(obj)
        kinds.append(obj["kind"])
    assert kinds == ["Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"]


def test_validation_catches_a_broken_manifest():
    broken = manifests(SPEC)["deployment.yaml"]
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(broken)


def test_deployment_probes_resources_and_security_match_the_image():
    pod = manifests(SPEC)["deployment.yaml"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == SPEC.image and container["ports"][0]["containerPort"] == PORT
    for probe, path in (("startupProbe", "/health"), ("readinessProbe", "/ready"), ("livenessProbe", "/health")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"] == container["resources"]["limits"]
    security = container["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] == UID and security["readOnlyRootFilesystem"]
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}} in pod["volumes"]
    assert not any(e["name"] == "LLMCTL_API_KEY" for e in container["env"])


def test_api_key_comes_from_a_secret_at_run_time():
    spec = K8sSpec(image=SPEC.image, name=SPEC.name, api_key_secret="llmctl-api-key")
    env = manifests(spec)["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "LLMCTL_API_KEY", "valueFrom": {"secretKeyRef": {"name": "llmctl-api-key",
                                                                     "key": "api-key"}}} in env
    _validate(manifests(spec)["deployment.yaml"])


def test_tls_secret_is_mounted_and_the_probes_speak_https():
    import typer.main

    from llmctl.cli.serve import serve

    spec = K8sSpec(image=SPEC.image, name=SPEC.name, tls_secret="tiny-tls", client_ca=True)
    deployment = manifests(spec)["deployment.yaml"]
    _validate(deployment)
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert all(container[p]["httpGet"]["scheme"] == "HTTPS" for p in ("startupProbe", "readinessProbe", "livenessProbe"))
    assert {"name": "tls", "secret": {"secretName": "tiny-tls", "defaultMode": 0o440}} in pod["volumes"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "tls")
    env = {e["name"]: e.get("value") for e in container["env"]}
    # Every file the server is pointed at lies in the mounted Secret, under the names `llmctl serve` reads.
    flags = {p.envvar for p in typer.main.get_command_from_info(
        typer.models.CommandInfo(callback=serve), pretty_exceptions_short=True, rich_markup_mode=None).params}
    for name in ("LLMCTL_SSL_CERTFILE", "LLMCTL_SSL_KEYFILE", "LLMCTL_SSL_CA_CERTS", "LLMCTL_CLIENT_CERTS"):
        assert name in flags and name in env
    assert {env["LLMCTL_SSL_CERTFILE"], env["LLMCTL_SSL_KEYFILE"], env["LLMCTL_SSL_CA_CERTS"]} == {
        f"{mount['mountPath']}/{key}" for key in ("tls.crt", "tls.key", "ca.crt")}
    assert env["LLMCTL_CLIENT_CERTS"] == "optional"  # kubelet's probes show no client certificate
    with pytest.raises(ValueError, match="need a TLS Secret"):
        K8sSpec(image=SPEC.image, name=SPEC.name, client_ca=True)


def test_cpu_only_pods_ask_for_no_gpu():
    spec = K8sSpec(image=SPEC.image, name=SPEC.name, gpus=0)
    limits = manifests(spec)["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in limits


def test_autoscaler_scales_on_the_queue_metric_the_server_exports():
    from llmctl.runtime.server import metrics

    hpa = manifests(SPEC)["hpa.yaml"]
    metric = hpa["spec"]["metrics"][0]
    assert hpa["apiVersion"] == "autoscaling/v2" and metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == QUEUE_METRIC
    prefix, name = QUEUE_METRIC.split(":")  # the default prefix, not --metrics-prefix vllm's
    assert prefix == "llmctl" and f'f"{{p}}:{name}"' in inspect.getsource(metrics)
    assert hpa["spec"]["scaleTargetRef"]["name"] == SPEC.name


def test_service_and_budget_select_the_deployments_pods():
    objs = manifests(SPEC)
    pod_labels = objs["deployment.yaml"]["spec"]["template"]["metadata"]["labels"]
    for selector in (objs["service.yaml"]["spec"]["selector"],
                     objs["pdb.yaml"]["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= pod_labels.items()
    assert objs["service.yaml"]["spec"]["ports"][0]["targetPort"] == "http"


@pytest.mark.parametrize("image, name", [("llmctl-ref:0.1.0", "llmctl-ref"),
                                         ("registry.example:5000/Team/My_Model:1", "my-model")])
def test_names_are_dns_labels(image, name):
    assert k8s_name(image) == name


def test_bad_names_are_refused():
    with pytest.raises(ValueError, match="DNS-1123"):
        K8sSpec(image="x:1", name="Not_A_Label")
