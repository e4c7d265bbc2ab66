"""The HTTP server's one typed configuration (the engine has its own, `EngineConfig`).

Every limit that protects the server from a careless or hostile client lives here, with its default;
`llmctl serve` gives each a flag and an `LLMCTL_*` variable, and the README's hardening section lists them.
"""

from __future__ import annotations

import math
import os
import resource
from dataclasses import dataclass, field

LOG_FORMATS = ("json", "text")
METRICS_PREFIXES = ("llmctl", "vllm")
CACHE_ISOLATION = ("shared", "api-key")
TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral")  # tool_calls.PARSERS, without importing it
CLIENT_CERTS = ("none", "optional", "required")  # mutual TLS: whether clients must show a certificate
FD_RESERVE = 64  # descriptors kept free beyond the connection cap: the model's files, logs, the engine


def default_max_connections() -> int:
    """What the process's open-file limit allows, less a reserve, so that accept() never runs out."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = 65536 if soft == resource.RLIM_INFINITY else soft
    return max(1, min(limit - FD_RESERVE, 10_000))


@dataclass
class ServerSettings:
    """How the server listens, whom it lets in, how much it queues, what each request may ask and what it logs.

    `max_queue_len` counts sequences beyond the engine's `max_num_seqs`, which run at once: the server
    admits at most `max_num_seqs + max_queue_len` sequences (a request with n choices over p prompts is
    n * p of them) and answers 429 beyond that, so that a burst waits in a bounded queue, not in memory.
    One request may hold at most `max_request_share` of that capacity, so that no single client can
    take every slot.
    """

    served_model_name: str
    host: str = "0.0.0.0"  # a server meant for containers; bind 127.0.0.1 to stay local
    port: int = 8000
    api_keys: tuple[str, ...] = ()  # any of them is let in; none: no authentication
    max_queue_len: int = 1024
    retry_after: int = 1  # seconds, sent with 429
    log_format: str = "json"
    log_prompts: bool = False
    shutdown_timeout: float = 30.0  # seconds that in-flight requests get after SIGTERM
    max_body_bytes: int = 8 << 20  # larger request bodies get 413 before they are read into memory
    # What one request may ask for (400 beyond):
    max_request_share: float = 0.25  # of the admission capacity, in sequences
    max_prompts: int = 64  # prompts in one /v1/completions batch
    max_n: int = 128  # choices per prompt
    max_stop: int = 16  # stop strings
    max_stop_chars: int = 256  # characters in one stop string
    max_logprobs: int = 20  # logprobs / top_logprobs
    # Connections (uvicorn / h11):
    max_connections: int = field(default_factory=default_max_connections)
    header_timeout: float = 10.0  # seconds a new connection has to send its request line and headers
    body_timeout: float = 30.0  # seconds the body may pause between two chunks
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection is kept open
    # Health: pending work but no completed engine step for this long turns /health 503.
    stall_timeout: float = 60.0
    # Prefix cache: "shared" (every client's prefixes serve every other's), or "api-key" (salted per key).
    cache_isolation: str = "shared"
    # TLS: a certificate (and its key, unless the file holds both) turns the port to HTTPS; CA certificates
    # with client_certs "optional" or "required" check clients' certificates (mutual TLS).
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_ca_certs: str | None = None
    client_certs: str = "none"
    # Tools: the model's tool-call format for tool_choice "auto" (None: read from its chat template).
    tool_call_parser: str | None = None
    # /metrics names: "llmctl:..." or, for dashboards and alerts written for vLLM, the same series as "vllm:...".
    metrics_prefix: str = "llmctl"

    def __post_init__(self) -> None:
        if not self.served_model_name:
            raise ValueError("served_model_name must not be empty")
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"--tool-call-parser must be one of {', '.join(TOOL_CALL_PARSERS)}, got "
                             f"{self.tool_call_parser!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        self.api_keys = tuple(self.api_keys)
        if any(not k or k != k.strip() or not k.isprintable() for k in self.api_keys):
            raise ValueError("API keys must be non-empty printable text without surrounding spaces: leave them "
                             "unset to serve without authentication")
        if self.retry_after < 1:
            raise ValueError(f"retry_after must be at least 1 second, got {self.retry_after}")
        for name in ("max_queue_len",):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        for name in ("max_body_bytes", "max_prompts", "max_n", "max_stop", "max_stop_chars", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be non-negative, got {self.max_logprobs}")
        if not 0 < self.max_request_share <= 1:
            raise ValueError(f"max_request_share must be in (0, 1], got {self.max_request_share}")
        for name in ("header_timeout", "body_timeout", "keep_alive_timeout", "stall_timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value}")
        if self.metrics_prefix not in METRICS_PREFIXES:
            raise ValueError(f"metrics_prefix must be one of {', '.join(METRICS_PREFIXES)}, got {self.metrics_prefix!r}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}, got {self.log_format!r}")
        if self.cache_isolation not in CACHE_ISOLATION:
            raise ValueError(f"cache_isolation must be one of {', '.join(CACHE_ISOLATION)}, "
                             f"got {self.cache_isolation!r}")
        if self.cache_isolation == "api-key" and not self.api_keys:
            raise ValueError("cache_isolation api-key needs API keys to salt by")
        self._check_tls()
        if not (math.isfinite(self.shutdown_timeout) and self.shutdown_timeout >= 0):
            raise ValueError(f"shutdown_timeout must be a non-negative number of seconds, "
                             f"got {self.shutdown_timeout}")

    def _check_tls(self) -> None:
        for flag, path in (("--ssl-certfile", self.ssl_certfile), ("--ssl-keyfile", self.ssl_keyfile),
                           ("--ssl-ca-certs", self.ssl_ca_certs)):
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"{flag}: no such file {path!r}")
        if (self.ssl_keyfile or self.ssl_ca_certs) and not self.ssl_certfile:
            raise ValueError("--ssl-keyfile and --ssl-ca-certs need --ssl-certfile: the server's own certificate")
        if self.client_certs not in CLIENT_CERTS:
            raise ValueError(f"client_certs must be one of {', '.join(CLIENT_CERTS)}, got {self.client_certs!r}")
        if self.client_certs != "none" and not self.ssl_ca_certs:
            raise ValueError(f"--client-certs {self.client_certs} needs --ssl-ca-certs to check them against")

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_certfile else "http"
