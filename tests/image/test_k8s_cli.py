"""`build-image --k8s` options: each bad value is one error line naming it (and nothing is written), and the
good ones reach the manifests."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from llmctl.cli.main import app
from llmctl.dockerfiles.k8s import Toleration
from llmctl.dockerfiles.k8s_spec import parse_node_selector

runner = CliRunner()
EFFECTS = "an effect of NoSchedule, PreferNoSchedule or NoExecute"
NAME = "must be a Kubernetes object name (DNS-1123 subdomain)"


@pytest.fixture
def no_pip(monkeypatch):
    """The wheelhouse stands in empty (pip takes half a minute): the options are under test, not the image."""
    def fake(dest: Path, base, constraints=None, **progress):
        dest.mkdir(parents=True, exist_ok=True)
        return "llmctl-0.1.0-py3-none-any.whl", "pip-26.3-py3-none-any.whl"

    monkeypatch.setattr("llmctl.dockerfiles.wheelhouse.build_wheelhouse", fake)


def build(tmp_path: Path, *options: str, k8s: bool = True):
    args = ["build-image", "--tag", "tiny-gptq:1", "--base", "local/base:1", "--python-version", "3.11",
            "--context-only", str(tmp_path / "ctx"), *(["--k8s", str(tmp_path / "k8s")] if k8s else []), *options]
    return runner.invoke(app, args, env={"DOCKER_HOST": "unix:///nonexistent.sock", "COLUMNS": "300"})


@pytest.mark.parametrize("options, line", [
    (["--k8s-namespace", "Prod"], "--k8s-namespace must be a DNS-1123 label, got 'Prod'"),
    (["--k8s-replicas", "0"], "--k8s-replicas must be at least 1, got 0"),
    (["--k8s-replicas", "3", "--k8s-max-replicas", "2"],
     "--k8s-max-replicas must be at least --k8s-replicas (3), got 2"),
    (["--k8s-cpu", "two"], "--k8s-cpu must be a positive Kubernetes quantity such as 2, 500m or 16Gi, got 'two'"),
    (["--k8s-cpu", "0"], "--k8s-cpu must be a positive Kubernetes quantity such as 2, 500m or 16Gi, got '0'"),
    (["--k8s-memory", "16GB"], "--k8s-memory must be a positive Kubernetes quantity such as 2, 500m or 16Gi, "
                               "got '16GB'"),
    (["--k8s-memory", "512m"], "--k8s-memory 512m is millibytes: write Mi for mebibytes"),
    (["--k8s-node-selector", "gpu"], "--k8s-node-selector must be KEY=VALUE with a label key and a label value, "
                                     "got 'gpu'"),
    (["--k8s-node-selector", "pool=a b"], "--k8s-node-selector must be KEY=VALUE with a label key and a label "
                                          "value, got 'pool=a b'"),
    (["--k8s-node-selector", "pool=a", "--k8s-node-selector", "pool=b"],
     "--k8s-node-selector gives 'pool' more than once"),
    (["--k8s-toleration", "gpu:Never"], "--k8s-toleration must be KEY=VALUE:EFFECT or KEY:EFFECT with a label key, "
                                        f"a label value and {EFFECTS}, got 'gpu:Never'"),
    (["--k8s-toleration", "nvidia.com/gpu"], "--k8s-toleration must be KEY=VALUE:EFFECT or KEY:EFFECT with a label "
                                             f"key, a label value and {EFFECTS}, got 'nvidia.com/gpu'"),
    (["--k8s-api-key-secret", "Keys!"], f"--k8s-api-key-secret {NAME}, got 'Keys!'"),
    (["--k8s-tls-secret", "TLS"], f"--k8s-tls-secret {NAME}, got 'TLS'"),
    (["--k8s-client-ca"], "client certificates (mutual TLS) need a TLS Secret for the server's own certificate"),
    (["--k8s-model-pvc", "my_models"], f"--k8s-model-pvc {NAME}, got 'my_models'"),
    (["--k8s-model-path", "tiny"], "--k8s-model-path needs --k8s-model-pvc, the claim it is a path in"),
    (["--k8s-model-pvc", "models", "--k8s-model-path", "/models/tiny"],
     "--k8s-model-path must be a relative path inside the claim, got '/models/tiny'"),
    (["--k8s-model-pvc", "models", "--k8s-model-path", "tiny/../.."],
     "--k8s-model-path must be a relative path inside the claim, got 'tiny/../..'"),
    (["--k8s-ingress-host", "LLM.example.com"], "--k8s-ingress-host must be a DNS name (*.example.com for a "
                                                "wildcard), got 'LLM.example.com'"),
    (["--k8s-ingress-host", "10.0.0.1"], "--k8s-ingress-host must be a DNS name (*.example.com for a wildcard), "
                                         "got '10.0.0.1'"),
    (["--k8s-ingress-tls-secret", "public-tls"],
     "--k8s-ingress-tls-secret needs --k8s-ingress-host, the name its certificate is for"),
    (["--k8s-ingress-host", "llm.example.com", "--k8s-ingress-tls-secret", "Public"],
     f"--k8s-ingress-tls-secret {NAME}, got 'Public'"),
])
def test_a_bad_option_is_one_line_naming_it(tmp_path, no_pip, options, line):
    result = build(tmp_path, *options)
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines() == [f"error: {line}"]
    assert not (tmp_path / "k8s").exists()


@pytest.mark.parametrize("option", [["--k8s-replicas", "2"], ["--k8s-toleration", "gpu:NoSchedule"],
                                    ["--k8s-client-ca"]])
def test_a_k8s_option_without_k8s_is_one_line(tmp_path, no_pip, option):
    result = build(tmp_path, *option, k8s=False)
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines() == [f"error: {option[0]} needs --k8s DIR"]


def test_every_option_reaches_the_manifests(tmp_path, no_pip):
    result = build(tmp_path, "--gpus", "2", "--k8s-namespace", "llm", "--k8s-replicas", "2",
                   "--k8s-max-replicas", "6", "--k8s-cpu", "8", "--k8s-memory", "64Gi",
                   "--k8s-node-selector", "pool=gpu", "--k8s-node-selector", "nvidia.com/gpu.present=true",
                   "--k8s-toleration", "nvidia.com/gpu:NoSchedule", "--k8s-toleration", "pool=llm:NoExecute",
                   "--k8s-api-key-secret", "llm-keys", "--k8s-tls-secret", "llm-tls", "--k8s-client-ca",
                   "--k8s-model-pvc", "models", "--k8s-model-path", "tiny/gptq",
                   "--k8s-ingress-host", "llm.example.com", "--k8s-ingress-tls-secret", "public-tls")
    assert result.exit_code == 0, result.output
    files = {path.name: yaml.safe_load(path.read_text()) for path in (tmp_path / "k8s").iterdir()}
    (line,) = [line for line in result.output.splitlines() if line.startswith("wrote deployment.yaml, ")]
    assert line.endswith(f" to {tmp_path / 'k8s'}") and set(line[6:].split(" to ")[0].split(", ")) == set(files)
    assert set(files) == {"deployment.yaml", "service.yaml", "networkpolicy.yaml", "servicemonitor.yaml",
                          "hpa.yaml", "pdb.yaml", "ingress.yaml", "kustomization.yaml", "inferenceservice.yaml",
                          "prometheus-adapter-rules.yaml"}
    assert files["kustomization.yaml"]["namespace"] == "llm"
    pod = files["deployment.yaml"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "gpu", "nvidia.com/gpu.present": "true"}
    assert [t["key"] for t in pod["tolerations"]] == ["nvidia.com/gpu", "pool"]
    limits = pod["containers"][0]["resources"]["limits"]
    assert limits == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "2"}
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert env["LLMCTL_MODEL"] == "/mnt/model/tiny/gptq" and "LLMCTL_API_KEY_FILE" in env
    assert env["LLMCTL_SSL_CA_CERTS"].endswith("/ca.crt")
    assert (files["hpa.yaml"]["spec"]["minReplicas"], files["hpa.yaml"]["spec"]["maxReplicas"]) == (2, 6)
    assert files["ingress.yaml"]["spec"]["tls"][0]["secretName"] == "public-tls"


@pytest.mark.parametrize("text, manifest", [
    ("nvidia.com/gpu:NoSchedule", {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}),
    ("pool=llm:NoExecute", {"key": "pool", "operator": "Equal", "value": "llm", "effect": "NoExecute"}),
    ("example.com/spot=:PreferNoSchedule",
     {"key": "example.com/spot", "operator": "Equal", "value": "", "effect": "PreferNoSchedule"}),
])
def test_tolerations_parse_both_forms(text, manifest):
    assert Toleration.parse(text).manifest() == manifest


def test_node_selectors_take_prefixed_keys_and_empty_values():
    assert parse_node_selector("cloud.google.com/gke-accelerator=nvidia-h100-80gb") == (
        "cloud.google.com/gke-accelerator", "nvidia-h100-80gb")
    assert parse_node_selector("dedicated=") == ("dedicated", "")


def test_a_bad_k8s_option_is_named_before_the_engine_is_asked(tmp_path):
    """No --context-only, no engine at DOCKER_HOST: the --k8s-* mistake is what the user hears first."""
    args = ["build-image", "--tag", "tiny-gptq:1", "--k8s", str(tmp_path / "k8s"), "--k8s-replicas", "0"]
    result = runner.invoke(app, args, env={"DOCKER_HOST": "unix:///nonexistent.sock", "COLUMNS": "300"})
    assert result.exit_code == 1 and "--k8s-replicas must be at least 1, got 0" in result.output, result.output
    assert not (tmp_path / "k8s").exists()


def test_the_service_monitor_can_be_left_out(tmp_path, no_pip):
    """A cluster without prometheus-operator refuses the kind: `kubectl apply -k` would fail on it."""
    result = build(tmp_path, "--k8s-no-service-monitor")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "k8s" / "servicemonitor.yaml").exists()
    kustomization = yaml.safe_load((tmp_path / "k8s" / "kustomization.yaml").read_text())
    assert "servicemonitor.yaml" not in kustomization["resources"] and "deployment.yaml" in kustomization["resources"]
