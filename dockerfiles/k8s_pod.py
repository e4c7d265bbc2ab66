"""The pod that serves: one container running the image, shared by the Deployment and the InferenceService.

The root filesystem is read-only, so everything the server writes goes to an emptyDir: /tmp, and a cache
directory for Triton's compiled kernels (TRITON_CACHE_DIR), the W4A16 kernels' tuning file
(LLMCTL_W4A16_CACHE) and the start-up GEMV choices (LLMCTL_GEMV_CACHE; the runtime writes both under ~/.cache
otherwise). The model is the baked one, or a
PersistentVolumeClaim mounted read-only that LLMCTL_MODEL points into. Secrets arrive as files.

Shutdown: a Terminating pod leaves the Service's endpoints while the preStop hook sleeps, so the proxies
stop sending before SIGTERM; then the server drains (/ready 503, in-flight requests get
LLMCTL_SHUTDOWN_TIMEOUT, then end themselves within the server's expiry grace). The grace period covers all
three, or the kubelet's SIGKILL would cut the drain short.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from llmctl.dockerfiles.context import PORT, UID
from llmctl.dockerfiles.k8s_spec import K8sSpec

TLS_DIR = "/etc/llmctl/tls"
API_KEY_DIR = "/etc/llmctl/api-key"
CACHE_DIR = "/var/cache/llmctl"
MODEL_MOUNT = "/mnt/model"
PRESTOP_SECONDS = 10  # how long endpoint removal takes to reach kube-proxy and ingress controllers
SHUTDOWN_SECONDS = 30  # LLMCTL_SHUTDOWN_TIMEOUT: what in-flight requests get after SIGTERM
EXPIRY_GRACE_SECONDS = 5  # the server's own margin after that (runtime/server/launch.py: EXPIRY_GRACE)
GRACE_SECONDS = PRESTOP_SECONDS + SHUTDOWN_SECONDS + EXPIRY_GRACE_SECONDS + 5


def pod_spec(spec: K8sSpec) -> dict:
    volumes, mounts = _volumes(spec)
    pod = {
        "automountServiceAccountToken": False,  # the server never calls the Kubernetes API
        # Service links would add {SERVICE}_PORT=tcp://... variables: a Service named llmctl sets LLMCTL_PORT.
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "terminationGracePeriodSeconds": GRACE_SECONDS,
        "containers": [_container(spec, mounts)],
        "volumes": volumes,
        # Replicas on separate nodes where the cluster can, so that one node's drain takes one replica.
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                       "whenUnsatisfiable": "ScheduleAnyway",
                                       "labelSelector": {"matchLabels": spec.selector()}}],
    }
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod["tolerations"] = [toleration.manifest() for toleration in spec.tolerations]
    return pod


def _container(spec: K8sSpec, mounts: list[dict]) -> dict:
    resources = {"cpu": spec.cpu, "memory": spec.memory}
    if spec.gpus:
        resources["nvidia.com/gpu"] = str(spec.gpus)  # extended resources: requests must equal limits
    return {
        "name": "server", "image": spec.image, "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": spec.port_name, "containerPort": PORT, "protocol": "TCP"}],
        "env": _env(spec),
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        # Loading weights and warming up can take minutes; the startup probe holds the others off till then.
        "startupProbe": _probe(spec, "/health", periodSeconds=10, failureThreshold=60),
        # /ready turns 503 as soon as SIGTERM arrives (draining), /health only when a restart would help.
        "readinessProbe": _probe(spec, "/ready", periodSeconds=5, failureThreshold=2),
        "livenessProbe": _probe(spec, "/health", periodSeconds=15, failureThreshold=3),
        # `sleep` is coreutils', in every base build-image takes (its probe of the base runs sh, uname, cut).
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SECONDS)]}}},
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID,
                            "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": mounts,
    }


def _probe(spec: K8sSpec, path: str, **timing) -> dict:
    scheme = {"scheme": "HTTPS"} if spec.tls_secret else {}
    return {"httpGet": {"path": path, "port": spec.port_name, **scheme}, "timeoutSeconds": 5, **timing}


def _env(spec: K8sSpec) -> list[dict]:
    env = {"LLMCTL_PORT": str(PORT), "LLMCTL_SHUTDOWN_TIMEOUT": str(SHUTDOWN_SECONDS),
           "TRITON_CACHE_DIR": f"{CACHE_DIR}/triton", "LLMCTL_W4A16_CACHE": f"{CACHE_DIR}/w4a16.json",
           "LLMCTL_GEMV_CACHE": f"{CACHE_DIR}/gemv.json"}
    if spec.gpus > 1:  # one model over the pod's GPUs
        env["LLMCTL_TENSOR_PARALLEL_SIZE"] = str(spec.gpus)
    if spec.model_pvc:
        path = PurePosixPath(MODEL_MOUNT, spec.model_path)
        # The image's LLMCTL_SERVED_MODEL_NAME names the baked model, not this one.
        env |= {"LLMCTL_MODEL": str(path), "LLMCTL_SERVED_MODEL_NAME": path.name if spec.model_path
                else spec.model_pvc}
    if spec.api_key_secret:
        env["LLMCTL_API_KEY_FILE"] = f"{API_KEY_DIR}/api-key"
    if spec.tls_secret:
        env |= {"LLMCTL_SSL_CERTFILE": f"{TLS_DIR}/tls.crt", "LLMCTL_SSL_KEYFILE": f"{TLS_DIR}/tls.key"}
        if spec.client_ca:
            env |= {"LLMCTL_SSL_CA_CERTS": f"{TLS_DIR}/ca.crt", "LLMCTL_CLIENT_CERTS": "optional"}
    return [{"name": name, "value": value} for name, value in env.items()]


def _volumes(spec: K8sSpec) -> tuple[list[dict], list[dict]]:
    """(volumes, the container's mounts of them)."""
    volumes = [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
               {"name": "cache", "emptyDir": {"sizeLimit": "2Gi"}}]
    mounts = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "cache", "mountPath": CACHE_DIR}]
    if spec.model_pvc:
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": spec.model_pvc, "readOnly": True}})
        mounts.append({"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True})
    if spec.api_key_secret:
        volumes.append({"name": "api-key", "secret": {"secretName": spec.api_key_secret, "defaultMode": 0o440,
                                                      "items": [{"key": "api-key", "path": "api-key"}]}})
        mounts.append({"name": "api-key", "mountPath": API_KEY_DIR, "readOnly": True})
    if spec.tls_secret:
        volumes.append({"name": "tls", "secret": {"secretName": spec.tls_secret, "defaultMode": 0o440}})
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
    if spec.gpus > 1:  # NCCL between the tensor-parallel ranks needs more than a container's 64 MB /dev/shm
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts
