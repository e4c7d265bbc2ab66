"""The serving pod matches the server and the image: probes, env names `llmctl serve` reads, writable cache
directories where the runtime writes, the drain on shutdown, secrets and the model as mounted files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import typer.main

from llmctl.cli.serve import serve
from llmctl.dockerfiles.context import PORT, UID
from llmctl.dockerfiles.k8s import K8sSpec, Toleration, manifests
from llmctl.dockerfiles.k8s_pod import GRACE_SECONDS, PRESTOP_SECONDS

SPEC = K8sSpec(image="registry.example:5000/team/tiny-gptq:2026.11.21", name="tiny-gptq")
W4A16_CONFIGS = Path(importlib.util.find_spec("llmctl.runtime.kernels.w4a16.configs").origin).read_text()
GEMV_CACHE = Path(importlib.util.find_spec("llmctl.runtime.kernels.gemv_cache").origin).read_text()


def pod(spec: K8sSpec = SPEC) -> dict:
    return manifests(spec)["deployment.yaml"]["spec"]["template"]["spec"]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


def serve_envvars() -> set[str]:
    command = typer.main.get_command_from_info(typer.models.CommandInfo(callback=serve),
                                               pretty_exceptions_short=True, rich_markup_mode=None)
    return {p.envvar for p in command.params}


def test_probes_resources_and_security_match_the_image():
    spec = pod()
    container = spec["containers"][0]
    assert container["image"] == SPEC.image and container["ports"][0]["containerPort"] == PORT
    for probe, path in (("startupProbe", "/health"), ("readinessProbe", "/ready"), ("livenessProbe", "/health")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}
    assert container["resources"]["limits"] == {"cpu": "2", "memory": "16Gi", "nvidia.com/gpu": "1"}
    assert container["resources"]["requests"] == container["resources"]["limits"]
    security = container["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] == UID and security["readOnlyRootFilesystem"]
    assert not spec["automountServiceAccountToken"] and not spec["enableServiceLinks"]
    assert "LLMCTL_API_KEY_FILE" not in env_of(container) and "nodeSelector" not in spec


def test_every_env_var_is_one_the_server_or_runtime_reads():
    spec = K8sSpec(image=SPEC.image, name=SPEC.name, api_key_secret="keys", tls_secret="tls", client_ca=True,
                   model_pvc="models")
    env = env_of(pod(spec)["containers"][0])
    runtime_reads = {"TRITON_CACHE_DIR"}  # Triton's own
    runtime_reads |= {name for name in env if name.startswith("LLMCTL_") and f'"{name}"' in
                      W4A16_CONFIGS + GEMV_CACHE}
    assert set(env) <= serve_envvars() | runtime_reads, set(env) - serve_envvars() - runtime_reads


def test_what_the_runtime_writes_lands_on_writable_volumes():
    """The root filesystem is read-only: Triton's cache and the W4A16 and GEMV choices need a writable mount."""
    spec = pod()
    container = spec["containers"][0]
    env = env_of(container)
    assert 'os.environ.get("LLMCTL_W4A16_CACHE"' in W4A16_CONFIGS  # the variables the runtime reads
    assert 'os.environ.get("LLMCTL_GEMV_CACHE"' in GEMV_CACHE
    empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    writable = [m["mountPath"] for m in container["volumeMounts"] if m["name"] in empty_dirs]
    for name in ("TRITON_CACHE_DIR", "LLMCTL_W4A16_CACHE", "LLMCTL_GEMV_CACHE"):
        assert any(env[name].startswith(f"{path}/") for path in writable), (name, env[name], writable)
    assert "/tmp" in writable


def test_the_pod_leaves_the_endpoints_before_it_drains():
    """preStop sleeps while the endpoints drop the pod; the grace period covers that, the server's drain
    (LLMCTL_SHUTDOWN_TIMEOUT) and its expiry grace, or SIGKILL would cut in-flight requests."""
    from llmctl.runtime.server.launch import EXPIRY_GRACE

    spec = pod()
    container = spec["containers"][0]
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(PRESTOP_SECONDS)]
    drain = float(env_of(container)["LLMCTL_SHUTDOWN_TIMEOUT"])
    assert spec["terminationGracePeriodSeconds"] == GRACE_SECONDS > PRESTOP_SECONDS + drain + EXPIRY_GRACE


def test_the_api_key_is_a_mounted_secret_file():
    spec = K8sSpec(image=SPEC.image, name=SPEC.name, api_key_secret="llm-keys")
    container = pod(spec)["containers"][0]
    volume = next(v for v in pod(spec)["volumes"] if v["name"] == "api-key")
    assert volume["secret"]["secretName"] == "llm-keys"
    assert volume["secret"]["items"] == [{"key": "api-key", "path": "api-key"}]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "api-key")
    assert mount["readOnly"] and env_of(container)["LLMCTL_API_KEY_FILE"] == f"{mount['mountPath']}/api-key"


def test_tls_secret_is_mounted_and_the_probes_speak_https():
    spec = K8sSpec(image=SPEC.image, name=SPEC.name, tls_secret="tiny-tls", client_ca=True)
    container = pod(spec)["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["scheme"] == "HTTPS"
        assert container[probe]["httpGet"]["port"] == container["ports"][0]["name"]
    assert {"name": "tls", "secret": {"secretName": "tiny-tls", "defaultMode": 0o440}} in pod(spec)["volumes"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "tls")
    env = env_of(container)
    assert {env["LLMCTL_SSL_CERTFILE"], env["LLMCTL_SSL_KEYFILE"], env["LLMCTL_SSL_CA_CERTS"]} == {
        f"{mount['mountPath']}/{key}" for key in ("tls.crt", "tls.key", "ca.crt")}
    assert env["LLMCTL_CLIENT_CERTS"] == "optional"  # kubelet's probes show no client certificate
    with pytest.raises(ValueError, match="need a TLS Secret"):
        K8sSpec(image=SPEC.image, name=SPEC.name, client_ca=True)


@pytest.mark.parametrize("path, model, served", [("", "/mnt/model", "models"),
                                                 ("tiny/gptq-4bit", "/mnt/model/tiny/gptq-4bit", "gptq-4bit")])
def test_a_model_on_a_claim_is_mounted_read_only_and_served(path, model, served):
    spec = K8sSpec(image=SPEC.image, name=SPEC.name, model_pvc="models", model_path=path)
    container = pod(spec)["containers"][0]
    claim = {"name": "model", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}
    assert claim in pod(spec)["volumes"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "model")
    env = env_of(container)
    assert mount["readOnly"] and env["LLMCTL_MODEL"] == model and model.startswith(mount["mountPath"])
    assert env["LLMCTL_SERVED_MODEL_NAME"] == served  # not the baked model's name the image carries
    assert "LLMCTL_MODEL" not in env_of(pod()["containers"][0])  # by default the baked model


def test_scheduling_options_reach_the_pod():
    spec = K8sSpec(image=SPEC.image, name=SPEC.name, gpus=0, cpu="500m", memory="2Gi",
                   node_selector=(("pool", "cpu"), ("kubernetes.io/arch", "amd64")),
                   tolerations=(Toleration("nvidia.com/gpu", "NoSchedule"), Toleration("pool", "NoExecute", "llm")))
    spec_ = pod(spec)
    assert spec_["nodeSelector"] == {"pool": "cpu", "kubernetes.io/arch": "amd64"}
    assert spec_["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "pool", "operator": "Equal", "value": "llm", "effect": "NoExecute"}]
    assert spec_["containers"][0]["resources"]["limits"] == {"cpu": "500m", "memory": "2Gi"}  # no GPU asked


def test_a_pod_of_several_gpus_splits_the_model_over_them():
    """--gpus 2: the server runs tensor-parallel over both (an env var serve reads) with a RAM-backed /dev/shm
    for NCCL; one GPU: neither."""
    spec = K8sSpec(image=SPEC.image, name=SPEC.name, gpus=2)
    template = pod(spec)
    container = template["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert env_of(container)["LLMCTL_TENSOR_PARALLEL_SIZE"] == "2"
    assert "LLMCTL_TENSOR_PARALLEL_SIZE" in serve_envvars()
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}} in template["volumes"]
    single = pod()
    assert "LLMCTL_TENSOR_PARALLEL_SIZE" not in env_of(single["containers"][0])
    assert all(v["name"] != "dshm" for v in single["volumes"])
