"""Scaling on the queue: the ServiceMonitor that scrapes it, the adapter rule that serves it, the HPA that reads it.

The path of `llmctl:num_requests_waiting`, the queue that grows when replicas fall behind: Prometheus scrapes
/metrics through the ServiceMonitor (prometheus-operator), which labels each series with its namespace and
pod; prometheus-adapter's rule serves it per pod under the same name through the custom metrics API; the
HPA adds a pod when the average queue passes the target.
"""

from __future__ import annotations

from llmctl.dockerfiles.k8s_spec import K8sSpec

QUEUE_METRIC = "llmctl:num_requests_waiting"


def adapter_header(spec: K8sSpec) -> str:
    path = f"/apis/custom.metrics.k8s.io/v1beta1/namespaces/{spec.namespace or 'NAMESPACE'}/pods/*/{QUEUE_METRIC}"
    return f"""\
# prometheus-adapter's rule for {QUEUE_METRIC}, the metric hpa.yaml scales on. These are values for
# the prometheus-community/prometheus-adapter Helm chart, not a Kubernetes object: kustomization.yaml does not
# list this file. Install or update the adapter with them (prometheus.url: your Prometheus's Service):
#   helm upgrade --install prometheus-adapter prometheus-community/prometheus-adapter -n monitoring \\
#     --set prometheus.url=http://prometheus.monitoring.svc -f prometheus-adapter-rules.yaml
# A list given with -f replaces the chart's: merge rules.custom by hand with rules you already have. Then
#   kubectl get --raw "{path}"
# answers with each pod's queue, and `kubectl describe hpa {spec.name}` shows the HPA reading it.
"""


def autoscaler(spec: K8sSpec) -> dict | None:
    if not spec.autoscaled:
        return None
    metric = {"type": "Pods", "pods": {"metric": {"name": QUEUE_METRIC},
                                       "target": {"type": "AverageValue", "averageValue": str(spec.queue_target)}}}
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": spec.metadata(),
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": spec.name},
                     "minReplicas": spec.replicas, "maxReplicas": spec.max_replicas, "metrics": [metric],
                     # A new replica takes minutes to load its model: scale down slowly, not on one quiet minute.
                     "behavior": {"scaleDown": {"stabilizationWindowSeconds": 600}}}}


def adapter_rules(spec: K8sSpec) -> dict | None:
    """`rules:` values for the prometheus-community/prometheus-adapter chart."""
    if not spec.autoscaled:
        return None
    # max, not sum, by pod: a pod scraped twice (ServiceMonitor and prometheus.io annotations) counts once.
    rule = {"seriesQuery": f'{QUEUE_METRIC}{{namespace!="",pod!=""}}',
            "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
            "name": {"matches": f"^{QUEUE_METRIC}$", "as": QUEUE_METRIC},
            "metricsQuery": "max(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)"}
    return {"rules": {"custom": [rule]}}


def service_monitor(spec: K8sSpec) -> dict | None:
    if spec.no_service_monitor:
        return None
    endpoint = {"port": spec.port_name, "path": "/metrics", "interval": "15s"}
    if spec.tls_secret:
        # The server's certificate names the host clients use, not the pod IP Prometheus dials; the
        # metrics are no secret (/metrics needs no key), so the scrape checks no name.
        endpoint |= {"scheme": "https", "tlsConfig": {"insecureSkipVerify": True}}
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": spec.metadata(),
            "spec": {"selector": {"matchLabels": spec.selector()}, "endpoints": [endpoint]}}
