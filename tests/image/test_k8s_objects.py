"""The objects around the pod agree with it and with each other: selectors, port names, the metric the HPA
reads and the adapter serves, a budget that fits the replicas, and the KServe alternative."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import yaml

from llmctl.dockerfiles.context import PORT
from llmctl.dockerfiles.k8s import QUEUE_METRIC, K8sSpec, manifests, write_manifests

IMAGE = "registry.example:5000/team/tiny-gptq:2026.11.21"
SPEC = K8sSpec(image=IMAGE, name="tiny-gptq")
TLS = K8sSpec(image=IMAGE, name="tiny-gptq", tls_secret="server-tls", ingress_host="llm.example.com",
              ingress_tls_secret="public-tls")


def pod_labels(objs: dict) -> dict:
    return objs["deployment.yaml"]["spec"]["template"]["metadata"]["labels"]


@pytest.mark.parametrize("spec", [SPEC, TLS], ids=["http", "https"])
def test_selectors_and_port_names_line_up(spec):
    objs = manifests(dataclasses.replace(spec, replicas=2))
    labels = pod_labels(objs)
    service = objs["service.yaml"]
    for selector in (service["spec"]["selector"], objs["pdb.yaml"]["spec"]["selector"]["matchLabels"],
                     objs["networkpolicy.yaml"]["spec"]["podSelector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    # The ServiceMonitor finds the Service by its labels and scrapes the port by the Service's name for it.
    monitor = objs["servicemonitor.yaml"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    port = service["spec"]["ports"][0]
    (container_port,) = objs["deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert port["targetPort"] == container_port["name"] == port["name"] == monitor["endpoints"][0]["port"]
    assert port["name"] == ("https" if spec.tls_secret else "http")  # meshes read the protocol from the name
    assert monitor["endpoints"][0]["path"] == "/metrics"
    assert (monitor["endpoints"][0].get("scheme") == "https") == bool(spec.tls_secret)


def test_the_network_policy_lets_in_the_server_port_alone():
    policy = manifests(SPEC)["networkpolicy.yaml"]["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    assert policy["ingress"] == [{"ports": [{"protocol": "TCP", "port": PORT}]}]


def test_the_ingress_routes_its_host_to_the_service_over_tls():
    assert "ingress.yaml" not in manifests(SPEC)
    objs = manifests(TLS)
    ingress = objs["ingress.yaml"]
    assert ingress["spec"]["tls"] == [{"hosts": ["llm.example.com"], "secretName": "public-tls"}]
    (rule,) = ingress["spec"]["rules"]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert rule["host"] == "llm.example.com" and backend["name"] == objs["service.yaml"]["metadata"]["name"]
    assert backend["port"]["name"] == objs["service.yaml"]["spec"]["ports"][0]["name"] == "https"
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"  # streams arrive as they come
    assert annotations["nginx.ingress.kubernetes.io/backend-protocol"] == "HTTPS"


def test_the_autoscaler_scales_on_the_queue_metric_the_server_exports():
    from llmctl.runtime.server import metrics

    objs = manifests(SPEC)
    hpa = objs["hpa.yaml"]
    metric = hpa["spec"]["metrics"][0]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == QUEUE_METRIC
    prefix, name = QUEUE_METRIC.split(":")  # the default prefix, not --metrics-prefix vllm's
    assert prefix == "llmctl" and f'f"{{p}}:{name}"' in inspect.getsource(metrics)
    assert hpa["spec"]["scaleTargetRef"]["name"] == objs["deployment.yaml"]["metadata"]["name"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 4)
    assert "replicas" not in objs["deployment.yaml"]["spec"]  # the HPA owns the count


def test_the_adapter_rule_serves_the_metric_the_hpa_reads(tmp_path):
    write_manifests(tmp_path, SPEC)
    text = (tmp_path / "prometheus-adapter-rules.yaml").read_text()
    assert text.startswith("# prometheus-adapter's rule") and "not a Kubernetes object" in text
    assert "helm upgrade --install prometheus-adapter" in text
    (rule,) = yaml.safe_load(text)["rules"]["custom"]
    assert rule["seriesQuery"].startswith(QUEUE_METRIC + "{") and rule["name"]["as"] == QUEUE_METRIC
    # The HPA asks for pods in its namespace: the series must map to both resources.
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert "<<.LabelMatchers>>" in rule["metricsQuery"] and "by (<<.GroupBy>>)" in rule["metricsQuery"]


def test_a_fixed_size_deployment_has_no_autoscaler():
    objs = manifests(K8sSpec(image=IMAGE, name="tiny-gptq", replicas=3, max_replicas=3))
    assert objs["deployment.yaml"]["spec"]["replicas"] == 3
    assert "hpa.yaml" not in objs and "prometheus-adapter-rules.yaml" not in objs


@pytest.mark.parametrize("replicas, budget", [(1, None), (2, 1), (5, 1)])
def test_the_disruption_budget_fits_the_replicas(replicas, budget):
    """One replica: no budget (maxUnavailable 1 would protect nothing, minAvailable 1 block every drain)."""
    objs = manifests(K8sSpec(image=IMAGE, name="tiny-gptq", replicas=replicas, max_replicas=8))
    pdb = objs.get("pdb.yaml")
    assert (pdb and pdb["spec"]["maxUnavailable"]) == budget
    if pdb:  # at the floor, all but one keep serving through a drain
        assert replicas - pdb["spec"]["maxUnavailable"] >= 1


def test_the_inference_service_runs_the_deployments_pod(tmp_path):
    spec = K8sSpec(image=IMAGE, name="tiny-gptq", namespace="llm", replicas=2, api_key_secret="keys",
                   model_pvc="models", tolerations=())
    write_manifests(tmp_path, spec)
    text = (tmp_path / "inferenceservice.yaml").read_text()
    assert text.startswith("# KServe InferenceService") and "not listed there" in text
    isvc = yaml.safe_load(text)
    pod = manifests(spec)["deployment.yaml"]["spec"]["template"]["spec"]
    predictor = isvc["spec"]["predictor"]
    (container,) = predictor.pop("containers")
    assert container == {**pod.pop("containers")[0], "name": "kserve-container"}  # same env, probes, resources
    assert {k: v for k, v in predictor.items() if k in pod} == pod  # same volumes, security, scheduling
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (2, 4)
    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "Standard"
    assert annotations["serving.kserve.io/autoscalerClass"] == "external"  # the queue HPA, not KServe's CPU one
    assert "tiny-gptq-predictor" in text  # the header says what that HPA must target
