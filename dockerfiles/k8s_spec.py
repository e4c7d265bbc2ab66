"""What the Kubernetes manifests are written from: one K8sSpec, checked when it is made.

Every value that reaches a manifest is checked here, against the rules the API server would apply, so
that a typo is one line naming the option and the value at build time, not a rejected `kubectl apply`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"  # DNS-1123 label: names, namespaces
_SUBDOMAIN = rf"{_LABEL}(\.{_LABEL})*"  # DNS-1123 subdomain: Secret and PVC names, hosts
_NAME_PART = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"  # a label key's name, a label value
_QUANTITY = r"(\d+(\.\d*)?|\.\d+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?\d+)?"  # unsigned
EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


@dataclass(frozen=True)
class Toleration:
    """KEY=VALUE:EFFECT tolerates that taint (operator Equal); KEY:EFFECT any value of KEY (Exists)."""

    key: str
    effect: str
    value: str | None = None

    def __post_init__(self) -> None:
        if not (_label_key(self.key) and self.effect in EFFECTS and (self.value is None or _label_value(self.value))):
            raise ValueError(_bad_toleration(self.text))

    @property
    def text(self) -> str:
        return f"{self.key}:{self.effect}" if self.value is None else f"{self.key}={self.value}:{self.effect}"

    @classmethod
    def parse(cls, text: str) -> Toleration:
        key_value, colon, effect = text.rpartition(":")
        if not colon:
            raise ValueError(_bad_toleration(text))
        key, eq, value = key_value.partition("=")
        return cls(key, effect, value if eq else None)

    def manifest(self) -> dict:
        if self.value is None:
            return {"key": self.key, "operator": "Exists", "effect": self.effect}
        return {"key": self.key, "operator": "Equal", "value": self.value, "effect": self.effect}


def parse_node_selector(text: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not (eq and _label_key(key) and _label_value(value)):
        raise ValueError(f"--k8s-node-selector must be KEY=VALUE with a label key and a label value, got {text!r}")
    return key, value


@dataclass(frozen=True)
class K8sSpec:
    image: str  # NAME:VERSION
    name: str  # DNS-1123 label for every object
    namespace: str = ""  # empty: kubectl's current namespace
    gpus: int = 1
    replicas: int = 1  # the HPA's floor; a Deployment of fixed size when max_replicas == replicas
    max_replicas: int = 4
    queue_target: int = 8  # waiting sequences per pod before the HPA adds one
    cpu: str = "2"
    memory: str = "16Gi"
    node_selector: tuple[tuple[str, str], ...] = ()
    tolerations: tuple[Toleration, ...] = ()
    api_key_secret: str = ""  # a Secret with key `api-key` (keys one per line); the image never holds one
    tls_secret: str = ""  # a kubernetes.io/tls Secret: serve HTTPS with its tls.crt and tls.key
    client_ca: bool = False  # the TLS Secret's ca.crt checks clients' certificates (mutual TLS, optional)
    model_pvc: str = ""  # serve the model on this PersistentVolumeClaim instead of the baked one
    model_path: str = ""  # the model's directory inside the claim
    ingress_host: str = ""
    ingress_tls_secret: str = ""  # the Ingress terminates TLS for ingress_host with this Secret
    no_service_monitor: bool = False  # the cluster has no prometheus-operator: leave the ServiceMonitor out

    def __post_init__(self) -> None:
        self._check_names()
        self._check_sizes()
        self._check_node_selector()
        self._check_model_path()
        if self.client_ca and not self.tls_secret:
            raise ValueError("client certificates (mutual TLS) need a TLS Secret for the server's own certificate")
        host = self.ingress_host.removeprefix("*.")
        if self.ingress_host and not (_subdomain(host) and not re.fullmatch(r"[\d.]+", host)):
            raise ValueError(f"--k8s-ingress-host must be a DNS name (*.example.com for a wildcard), "
                             f"got {self.ingress_host!r}")
        if self.ingress_tls_secret and not self.ingress_host:
            raise ValueError("--k8s-ingress-tls-secret needs --k8s-ingress-host, the name its certificate is for")

    def _check_names(self) -> None:
        if not re.fullmatch(_LABEL, self.name):
            raise ValueError(f"Kubernetes names are DNS-1123 labels, got {self.name!r}")
        if self.namespace and not re.fullmatch(_LABEL, self.namespace):
            raise ValueError(f"--k8s-namespace must be a DNS-1123 label, got {self.namespace!r}")
        for flag, name in (("--k8s-api-key-secret", self.api_key_secret), ("--k8s-tls-secret", self.tls_secret),
                           ("--k8s-model-pvc", self.model_pvc), ("--k8s-ingress-tls-secret", self.ingress_tls_secret)):
            if name and not _subdomain(name):
                raise ValueError(f"{flag} must be a Kubernetes object name (DNS-1123 subdomain), got {name!r}")

    def _check_sizes(self) -> None:
        if self.gpus < 0:
            raise ValueError(f"--gpus must be at least 0, got {self.gpus}")
        if self.replicas < 1:
            raise ValueError(f"--k8s-replicas must be at least 1, got {self.replicas}")
        if self.max_replicas < self.replicas:
            raise ValueError(f"--k8s-max-replicas must be at least --k8s-replicas ({self.replicas}), "
                             f"got {self.max_replicas}")
        if self.queue_target < 1:
            raise ValueError(f"the queue target must be at least 1, got {self.queue_target}")
        _check_quantity("--k8s-cpu", self.cpu)
        _check_quantity("--k8s-memory", self.memory)
        if self.memory.endswith("m"):
            raise ValueError(f"--k8s-memory {self.memory} is millibytes: write Mi for mebibytes")

    def _check_node_selector(self) -> None:
        keys = [key for key, _ in self.node_selector]
        for key, value in self.node_selector:
            parse_node_selector(f"{key}={value}")
            if keys.count(key) > 1:
                raise ValueError(f"--k8s-node-selector gives {key!r} more than once")

    def _check_model_path(self) -> None:
        if not self.model_path:
            return
        if not self.model_pvc:
            raise ValueError("--k8s-model-path needs --k8s-model-pvc, the claim it is a path in")
        parts = PurePosixPath(self.model_path).parts
        if not parts or self.model_path.startswith("/") or ".." in parts:
            raise ValueError(f"--k8s-model-path must be a relative path inside the claim, got {self.model_path!r}")

    @property
    def autoscaled(self) -> bool:
        """An HPA scales the Deployment (it owns the replica count) when it has room to."""
        return self.max_replicas > self.replicas

    @property
    def port_name(self) -> str:
        """The server port's name in the pod and the Service: meshes such as Istio read the protocol from it."""
        return "https" if self.tls_secret else "http"

    # New dicts on every call: YAML would write a dict shared by two objects as an anchor and an alias.
    def selector(self) -> dict:
        return {"app.kubernetes.io/name": self.name}

    def labels(self) -> dict:
        version = re.sub(r"[^A-Za-z0-9_.-]", "-", self.image.rpartition(":")[2])[:63].strip("-_.") or "unknown"
        return {**self.selector(), "app.kubernetes.io/version": version, "app.kubernetes.io/managed-by": "llmctl"}

    def metadata(self, **extra) -> dict:
        return {"name": self.name, **({"namespace": self.namespace} if self.namespace else {}),
                "labels": self.labels(), **extra}


def spec_from_options(image: str, gpus: int, *, node_selector=(), toleration=(), **options) -> K8sSpec:
    """The spec `build-image --k8s` writes: its --k8s-* options as typed (unparsed KEY=VALUE strings)."""
    return K8sSpec(image=image, name=k8s_name(image), gpus=gpus,
                   node_selector=tuple(parse_node_selector(text) for text in node_selector),
                   tolerations=tuple(Toleration.parse(text) for text in toleration), **options)


def k8s_name(image: str) -> str:
    """The image's repository name as a DNS-1123 label: registry.example/team/My_Model:1 -> my-model."""
    base = image.rpartition(":")[0].rsplit("/", 1)[-1].lower()
    return re.sub(r"[^a-z0-9]+", "-", base).strip("-")[:63].strip("-") or "llmctl"


def _check_quantity(flag: str, value: str) -> None:
    if not re.fullmatch(_QUANTITY, value) or not float(re.match(r"[\d.]*", value)[0] or 0):
        raise ValueError(f"{flag} must be a positive Kubernetes quantity such as 2, 500m or 16Gi, got {value!r}")


def _bad_toleration(text: str) -> str:
    return (f"--k8s-toleration must be KEY=VALUE:EFFECT or KEY:EFFECT with a label key, a label value and an "
            f"effect of {', '.join(EFFECTS[:-1])} or {EFFECTS[-1]}, got {text!r}")


def _subdomain(name: str) -> bool:
    return len(name) <= 253 and re.fullmatch(_SUBDOMAIN, name) is not None


def _label_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    return re.fullmatch(_NAME_PART, name) is not None and (not prefix or _subdomain(prefix))


def _label_value(value: str) -> bool:
    return not value or re.fullmatch(_NAME_PART, value) is not None
