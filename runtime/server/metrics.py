"""Prometheus metrics under vLLM's names with the `llmctl:` prefix (or `vllm:`, `--metrics-prefix`), labelled by
the served model name, and every HTTP response counted by route, method and status.

Latencies come from the engine's own timestamps (arrival, first scheduled, first token, finish), except
inter-token latency, which is the gap between two outputs of a sequence as the server receives them:
that is what a streaming client sees. Engine state (running, waiting, KV usage) is read when scraped.
Each app has its own registry, so that several servers can live in one process (tests do).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from llmctl.runtime.outputs import RequestOutput

# vLLM's buckets, with finer low ones for ITL: a small model decodes a token in a few milliseconds.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
               0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize", "/tokenizer_info",
          "/health", "/ready", "/metrics", "/version"}
METHODS = {"GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH"}
E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class Metrics:
    def __init__(self, lifecycle, model_name: str, in_flight: Callable[[], int], prefix: str = "llmctl") -> None:
        self.registry = CollectorRegistry()
        r, label, p = self.registry, ["model_name"], prefix
        self.prompt_tokens = Counter(f"{p}:prompt_tokens", "Prefill tokens processed.", label,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter(f"{p}:generation_tokens", "Generation tokens processed.", label,
                                         registry=r).labels(model_name)
        self._success = Counter(f"{p}:request_success", "Finished sequences, by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        self.ttft = Histogram(f"{p}:time_to_first_token_seconds", "Time to first token.", label,
                              buckets=TTFT_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram(f"{p}:inter_token_latency_seconds", "Time between two output tokens.", label,
                             buckets=ITL_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram(f"{p}:e2e_request_latency_seconds", "Arrival to finish.", label,
                             buckets=E2E_BUCKETS, registry=r).labels(model_name)
        self.queue_time = Histogram(f"{p}:request_queue_time_seconds", "Arrival to first scheduled.", label,
                                    buckets=E2E_BUCKETS, registry=r).labels(model_name)
        self._http = Counter(f"{p}:http_requests", "HTTP responses, by route, method and status code.",
                             ["model_name", "handler", "method", "status"], registry=r)
        self.model_name = model_name
        r.register(_EngineState(lifecycle, model_name, in_flight, p))

    def on_output(self, out: RequestOutput, previous: float | None, now: float) -> None:
        """One output of one sequence; `previous`: when its last output arrived (None: this is the first)."""
        self.generation_tokens.inc(len(out.new_token_ids))
        if previous is None:
            self.prompt_tokens.inc(len(out.prompt_token_ids))
            if out.first_token_time is not None:
                self.ttft.observe(out.first_token_time - out.arrival_time)
        else:
            self.itl.observe(now - previous)
        if out.finished:
            self.on_finish(out.finish_reason or "stop")
            if out.finish_time is not None:
                self.e2e.observe(out.finish_time - out.arrival_time)
            if out.first_scheduled_time is not None:
                self.queue_time.observe(out.first_scheduled_time - out.arrival_time)

    def on_finish(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()

    def on_http(self, method: str, path: str, status: int) -> None:
        """One response (the access log's): paths outside the routes count as "other", so that a scan of random
        URLs cannot grow the label set."""
        handler = path if path in ROUTES else "/v1/models/{model}" if path.startswith("/v1/models/") else "other"
        self._http.labels(self.model_name, handler, method if method in METHODS else "other", str(status)).inc()


class _EngineState:
    """Read at scrape time. The engine thread owns these structures; len() of them is safe to read here."""

    def __init__(self, lifecycle, model_name: str, in_flight: Callable[[], int], prefix: str) -> None:
        self.lifecycle = lifecycle  # its engine is None while the model loads
        self.labels = [model_name]
        self.in_flight = in_flight
        self.prefix = prefix

    def collect(self):
        p = self.prefix
        state, _ = self.lifecycle.state()
        yield self._gauge(f"{p}:server_ready", "1 while the server takes new requests (what /ready says).",
                          float(state == "serving"))
        engine = self.lifecycle.engine
        if engine is None:
            return
        yield self._gauge(f"{p}:engine_stall_seconds", "Seconds without a completed engine step while work is "
                          "pending (0 when idle); /health turns 503 past the stall timeout.", engine.stalled_for())
        core = engine.engine
        running = len(core.scheduler.running)
        # Waiting counts what the server admitted and the engine does not run yet, including requests
        # still on their way to the scheduler's queue.
        yield self._gauge(f"{p}:num_requests_running", "Sequences in the running batch.", running)
        yield self._gauge(f"{p}:num_requests_waiting", "Sequences admitted but not running.",
                          max(self.in_flight() - running, 0))
        yield self._gauge(f"{p}:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).",
                          core.block_manager.usage())
        yield self._counter(f"{p}:num_preemptions", "Preempted sequences.", core.scheduler.num_preemptions)
        yield self._counter(f"{p}:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                            core.block_manager.prefix_queries)
        yield self._counter(f"{p}:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                            core.block_manager.prefix_hits)
        spec = core.speculator
        if spec is not None:  # vLLM's names; mean accepted length = 1 + accepted / drafts
            yield self._counter(f"{p}:spec_decode_num_drafts", "Speculating sequence-steps.", spec.num_drafts)
            yield self._counter(f"{p}:spec_decode_num_draft_tokens", "Draft tokens proposed.", spec.num_draft_tokens)
            yield self._counter(f"{p}:spec_decode_num_accepted_tokens", "Draft tokens accepted.",
                                spec.num_accepted_tokens)

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=["model_name"])
        family.add_metric(self.labels, value)
        return family

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=["model_name"])
        family.add_metric(self.labels, value)
        return family
