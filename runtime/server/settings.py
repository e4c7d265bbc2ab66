"""The HTTP server's one typed configuration (the engine has its own, `EngineConfig`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

LOG_FORMATS = ("json", "text")


@dataclass
class ServerSettings:
    """How the server listens, whom it lets in, how much it queues and what it logs.

    `max_queue_len` counts sequences beyond the engine's `max_num_seqs`, which run at once: the server
    admits at most `max_num_seqs + max_queue_len` sequences (a request with n choices over p prompts is
    n * p of them) and answers 429 beyond that, so that a burst waits in a bounded queue, not in memory.
    """

    served_model_name: str
    host: str = "0.0.0.0"  # a server meant for containers; bind 127.0.0.1 to stay local
    port: int = 8000
    api_key: str | None = None
    max_queue_len: int = 1024
    retry_after: int = 1  # seconds, sent with 429
    log_format: str = "json"
    log_prompts: bool = False
    shutdown_timeout: float = 30.0  # seconds that in-flight requests get after SIGTERM
    max_body_bytes: int = 8 << 20  # larger request bodies get 413 before they are read into memory

    def __post_init__(self) -> None:
        if not self.served_model_name:
            raise ValueError("served_model_name must not be empty")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.api_key == "":
            raise ValueError("api_key must not be empty: leave it unset to serve without authentication")
        if self.retry_after < 1:
            raise ValueError(f"retry_after must be at least 1 second, got {self.retry_after}")
        if self.max_queue_len < 0:
            raise ValueError(f"max_queue_len must be non-negative, got {self.max_queue_len}")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be positive, got {self.max_body_bytes}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}, got {self.log_format!r}")
        if not (math.isfinite(self.shutdown_timeout) and self.shutdown_timeout >= 0):
            raise ValueError(f"shutdown_timeout must be a non-negative number of seconds, "
                             f"got {self.shutdown_timeout}")
