"""A KServe InferenceService: the same server, for clusters that run their models through KServe.

An alternative to the kustomization, not a part of it: a custom predictor running the image with the
Deployment's own pod (env, probes, resources, volumes, security, scheduling), in KServe's Standard mode
(plain Deployment and Service, no Knative).
"""

from __future__ import annotations

from llmctl.dockerfiles.k8s_metrics import QUEUE_METRIC
from llmctl.dockerfiles.k8s_pod import pod_spec
from llmctl.dockerfiles.k8s_spec import K8sSpec

KSERVE = "serving.kserve.io"


def inference_service(spec: K8sSpec) -> dict:
    predictor = pod_spec(spec)
    predictor["containers"][0]["name"] = "kserve-container"  # the name KServe looks for in a custom predictor
    annotations = {
        f"{KSERVE}/deploymentMode": "Standard",  # "RawDeployment" before KServe 0.16
        # KServe's own HPA scales on CPU or memory only; the queue needs the HPA of hpa.yaml (header).
        f"{KSERVE}/autoscalerClass": "external" if spec.autoscaled else "none",
    }
    return {"apiVersion": f"{KSERVE}/v1beta1", "kind": "InferenceService",
            "metadata": spec.metadata(annotations=annotations),
            "spec": {"predictor": {"minReplicas": spec.replicas, "maxReplicas": spec.max_replicas, **predictor}}}


def kserve_header(spec: K8sSpec) -> str:
    scaling = (f"""\
# It leaves scaling to an HPA of your own: hpa.yaml with scaleTargetRef.name {spec.name}-predictor (the
# Deployment KServe makes), with prometheus-adapter-rules.yaml for {QUEUE_METRIC}.
""" if spec.autoscaled else f"# It runs {spec.replicas} replica(s), the minReplicas below.\n")
    return f"""\
# KServe InferenceService: the alternative to kustomization.yaml on a cluster with KServe (0.16 or newer;
# before, write RawDeployment for Standard), not listed there. Apply one or the other, not both:
#   kubectl apply -f inferenceservice.yaml
# Its predictor is the Deployment's pod (same image, env, probes, resources, volumes), named kserve-container.
{scaling}\
# KServe makes the Service, {spec.name}-predictor, and gives it and its pods this object's labels, so
# networkpolicy.yaml and servicemonitor.yaml apply on this path too (ingress.yaml names the other Service).
"""
