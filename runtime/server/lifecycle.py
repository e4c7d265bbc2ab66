"""Where the server is in its life, for probes, metrics and requests.

    loading   the port is open, the model is not loaded yet: /health and /ready 503 with this status (a
              Kubernetes startupProbe gives it time), /v1/* 503
    serving   /health and /ready 200
    stalled   work is pending but no engine step has completed for `stall_timeout` (a hung kernel, a stuck
              step): /health 503, so an orchestrator restarts the process; /ready 503
    draining  SIGTERM arrived: in-flight requests finish, /ready 503 so that no new traffic comes;
              when the shutdown timeout expires, `expired` is set and every request still running ends
              itself cleanly (an error event and [DONE] for streams, a JSON 503 otherwise)
    stopped   the engine loop died: /health and /ready 503, and the process exits 1
"""

from __future__ import annotations

import asyncio

from llmctl.runtime.async_engine import AsyncEngine


class Lifecycle:
    def __init__(self, stall_timeout: float) -> None:
        self.stall_timeout = stall_timeout
        self.engine: AsyncEngine | None = None  # set once loaded
        self.draining = False
        self.expired = asyncio.Event()  # binds to the serving loop when first awaited

    def state(self) -> tuple[str, str | None]:
        """(state, the reason when it is not serving)."""
        engine = self.engine
        if engine is None:
            return "loading", "the model is loading"
        if not engine.alive:
            return "stopped", "the engine loop has stopped; see the server log"
        stalled = engine.stalled_for()
        if stalled > self.stall_timeout:
            return "stalled", (f"work is pending but no engine step has completed for {stalled:.0f} s "
                               f"(limit {self.stall_timeout:g} s)")
        if self.draining:
            return "draining", "the server is shutting down"
        return "serving", None

    def health(self) -> tuple[int, dict]:
        """Liveness: 200 while the engine serves or drains; 503 while loading, and when a restart would help."""
        state, reason = self.state()
        if state in ("loading", "stopped", "stalled"):
            return 503, {"status": state, "reason": reason}
        return 200, {"status": "ok" if state == "serving" else state}

    def ready(self) -> tuple[int, dict]:
        """Readiness: 200 only while new requests are welcome."""
        state, reason = self.state()
        if state == "serving":
            return 200, {"status": "ready"}
        return 503, {"status": state, "reason": reason}
