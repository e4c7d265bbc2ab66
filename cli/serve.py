"""`llmctl serve`: the OpenAI-compatible HTTP server on the runtime engine."""

from __future__ import annotations

from pathlib import Path

import typer

from llmctl.cli import engine_options
from llmctl.cli.console import fail

REFERENCE_MODEL_NAME = "llmctl-reference"
LIMITS = "Request limits"
CONNECTIONS = "Connections"
TLS = "TLS"


def serve(
    model: str = typer.Argument(None, help="Model directory (default: the embedded reference model).",
                                envvar="LLMCTL_MODEL", show_default=False),
    host: str = typer.Option("0.0.0.0", envvar="LLMCTL_HOST", help="Address to listen on."),
    port: int = typer.Option(8000, envvar="LLMCTL_PORT", help="Port to listen on.", min=0, max=65535),
    api_key: str = typer.Option(None, envvar="LLMCTL_API_KEY", show_default=False,
                                help="Require 'Authorization: Bearer <key>' on /v1/*; several keys (tenants) "
                                     "separated by commas (default: no key)."),
    api_key_file: Path = typer.Option(None, envvar="LLMCTL_API_KEY_FILE", show_default=False, dir_okay=False,
                                      help="Read the keys from this file instead, one per line or separated by "
                                           "commas (a mounted Docker or Kubernetes Secret)."),
    served_model_name: str = typer.Option(None, envvar="LLMCTL_SERVED_MODEL_NAME", show_default=False,
                                          help="Model name clients send (default: the model directory's)."),
    max_num_seqs: int = typer.Option(256, envvar="LLMCTL_MAX_NUM_SEQS", min=1,
                                     help="Sequences in one batch at most."),
    max_num_batched_tokens: int = typer.Option(8192, envvar="LLMCTL_MAX_NUM_BATCHED_TOKENS", min=1,
                                               help="Tokens computed in one step at most."),
    gpu_memory_utilization: float = typer.Option(0.90, envvar="LLMCTL_GPU_MEMORY_UTILIZATION",
                                                 help="Share of GPU memory for weights and KV cache."),
    max_model_len: int = typer.Option(None, envvar="LLMCTL_MAX_MODEL_LEN", show_default=False,
                                      help="Context length cap (default: the model's)."),
    max_queue_len: int = typer.Option(1024, envvar="LLMCTL_MAX_QUEUE_LEN", min=0,
                                      help="Sequences that may wait beyond max-num-seqs; more get 429."),
    log_format: str = typer.Option("json", envvar="LLMCTL_LOG_FORMAT", help="json or text."),
    log_prompts: bool = typer.Option(False, envvar="LLMCTL_LOG_PROMPTS",
                                     help="Put prompts in the access log (off: logs carry no prompt text)."),
    shutdown_timeout: float = typer.Option(30.0, envvar="LLMCTL_SHUTDOWN_TIMEOUT", min=0.0,
                                           help="Seconds in-flight requests get to finish after SIGTERM; then "
                                                "they end with an error (503, or an error event)."),
    cache_isolation: str = typer.Option("shared", envvar="LLMCTL_CACHE_ISOLATION",
                                        help="Prefix cache: shared (a client's cached_tokens can reveal what "
                                             "others sent) or api-key (each key's prefixes apart)."),
    stall_timeout: float = typer.Option(60.0, envvar="LLMCTL_STALL_TIMEOUT",
                                        help="Seconds without a completed engine step, with work pending, "
                                             "before /health turns 503."),
    max_body_bytes: int = typer.Option(8 << 20, envvar="LLMCTL_MAX_BODY_BYTES", min=1, rich_help_panel=LIMITS,
                                       help="Largest request body accepted; larger ones get 413."),
    max_request_share: float = typer.Option(0.25, envvar="LLMCTL_MAX_REQUEST_SHARE", rich_help_panel=LIMITS,
                                            help="Share of the admission capacity (max-num-seqs + "
                                                 "max-queue-len) one request may take (prompts x n)."),
    max_prompts: int = typer.Option(64, envvar="LLMCTL_MAX_PROMPTS", min=1, rich_help_panel=LIMITS,
                                    help="Prompts in one /v1/completions request."),
    max_n: int = typer.Option(128, envvar="LLMCTL_MAX_N", min=1, rich_help_panel=LIMITS,
                              help="Choices (n) per prompt."),
    max_stop: int = typer.Option(16, envvar="LLMCTL_MAX_STOP", min=1, rich_help_panel=LIMITS,
                                 help="Stop strings (and stop token ids) per request."),
    max_stop_chars: int = typer.Option(256, envvar="LLMCTL_MAX_STOP_CHARS", min=1, rich_help_panel=LIMITS,
                                       help="Characters in one stop string."),
    max_logprobs: int = typer.Option(20, envvar="LLMCTL_MAX_LOGPROBS", min=0, rich_help_panel=LIMITS,
                                     help="logprobs / top_logprobs at most."),
    max_connections: int = typer.Option(None, envvar="LLMCTL_MAX_CONNECTIONS", min=1, show_default=False,
                                        rich_help_panel=CONNECTIONS,
                                        help="Open connections at most; more get 503 (default: the open-file "
                                             "limit less 64, at most 10,000)."),
    header_timeout: float = typer.Option(10.0, envvar="LLMCTL_HEADER_TIMEOUT", rich_help_panel=CONNECTIONS,
                                         help="Seconds a connection has to send its request's headers."),
    body_timeout: float = typer.Option(30.0, envvar="LLMCTL_BODY_TIMEOUT", rich_help_panel=CONNECTIONS,
                                       help="Seconds a request body may pause between two chunks (408)."),
    keep_alive_timeout: float = typer.Option(5.0, envvar="LLMCTL_KEEP_ALIVE_TIMEOUT", rich_help_panel=CONNECTIONS,
                                             help="Seconds an idle keep-alive connection stays open."),
    ssl_certfile: str = typer.Option(None, envvar="LLMCTL_SSL_CERTFILE", rich_help_panel=TLS,
                                     help="The server's certificate (PEM): serve HTTPS."),
    ssl_keyfile: str = typer.Option(None, envvar="LLMCTL_SSL_KEYFILE", rich_help_panel=TLS,
                                    help="Its private key (PEM), unless the certificate file holds it."),
    ssl_ca_certs: str = typer.Option(None, envvar="LLMCTL_SSL_CA_CERTS", rich_help_panel=TLS,
                                     help="CA certificates that clients' certificates are checked against."),
    client_certs: str = typer.Option("none", envvar="LLMCTL_CLIENT_CERTS", rich_help_panel=TLS,
                                     help="Mutual TLS: none, optional or required (needs --ssl-ca-certs)."),
    tool_call_parser: str = typer.Option(None, envvar="LLMCTL_TOOL_CALL_PARSER", show_default=False,
                                         help="The model's tool-call format for tool_choice auto: hermes, "
                                              "llama3_json or mistral (default: read from its chat template)."),
    metrics_prefix: str = typer.Option("llmctl", envvar="LLMCTL_METRICS_PREFIX",
                                       help="/metrics names: llmctl, or vllm for dashboards made for vLLM "
                                            "(vllm:num_requests_running, ...)."),
    scheduling_policy: str = typer.Option("fcfs", envvar="LLMCTL_SCHEDULING_POLICY",
                                          help="fcfs, or priority: requests' 'priority' field (lower first) orders "
                                               "admission and preemption."),
    dtype: str = typer.Option("auto", envvar="LLMCTL_DTYPE", help="auto, float16, bfloat16 or float32."),
    kv_cache_dtype: str = engine_options.kv_cache_dtype(),
    speculative: str = engine_options.speculative(),
    num_speculative_tokens: int = engine_options.num_speculative_tokens(),
    draft_model: str = engine_options.draft_model(),
    tensor_parallel_size: int = engine_options.tensor_parallel_size(),
    device: str = typer.Option("auto", envvar="LLMCTL_DEVICE", help="auto, cuda or cpu."),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (completions, chat, models, health, ready, metrics)."""
    try:
        from llmctl.runtime.async_engine import AsyncEngine
        from llmctl.runtime.config import EngineConfig
        from llmctl.runtime.llm import default_model
        from llmctl.runtime.server.launch import run
        from llmctl.runtime.server.settings import ServerSettings

        name = served_model_name or (Path(model).resolve().name if model else REFERENCE_MODEL_NAME)
        keys = _api_keys(api_key, api_key_file)
        connection_cap = {"max_connections": max_connections} if max_connections is not None else {}
        settings = ServerSettings(
            served_model_name=name, host=host, port=port, api_keys=keys, max_queue_len=max_queue_len,
            log_format=log_format, log_prompts=log_prompts, shutdown_timeout=shutdown_timeout,
            max_body_bytes=max_body_bytes, max_request_share=max_request_share, max_prompts=max_prompts,
            max_n=max_n, max_stop=max_stop, max_stop_chars=max_stop_chars, max_logprobs=max_logprobs,
            header_timeout=header_timeout, body_timeout=body_timeout, keep_alive_timeout=keep_alive_timeout,
            stall_timeout=stall_timeout, cache_isolation=cache_isolation, ssl_certfile=ssl_certfile,
            ssl_keyfile=ssl_keyfile, ssl_ca_certs=ssl_ca_certs, client_certs=client_certs,
            tool_call_parser=tool_call_parser, metrics_prefix=metrics_prefix, **connection_cap)
        config = EngineConfig(model=model or default_model(), dtype=dtype, device=device,
                              max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                              gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                              scheduling_policy=scheduling_policy, kv_cache_dtype=kv_cache_dtype,
                              speculative=engine_options.speculative_config(speculative, num_speculative_tokens, draft_model),
                              tensor_parallel_size=tensor_parallel_size)
    except ImportError as exc:
        fail(f"{exc.name or exc} is missing: install the server's dependencies, `pip install 'llmctl[serve]'`")
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    try:
        code = run(lambda: AsyncEngine(config), settings, config)
    except (ValueError, FileNotFoundError) as exc:  # the model failed to load behind the open port
        fail(str(exc))
    except Exception as exc:  # noqa: BLE001 (out of memory, a CUDA error: still one line; -v shows the rest)
        fail(f"the model failed to load: {type(exc).__name__}: {exc}")
    if code:
        fail("the engine failed; see the log above", code)


def _api_keys(api_key: str | None, api_key_file: Path | None) -> tuple[str, ...]:
    """The keys from --api-key or --api-key-file (never both): ValueError naming what is wrong."""
    if api_key and api_key_file:
        raise ValueError("give the API keys with --api-key or --api-key-file (LLMCTL_API_KEY / "
                         "LLMCTL_API_KEY_FILE), not both")
    if api_key_file is None:
        return tuple(k.strip() for k in api_key.split(",")) if api_key else ()
    try:
        text = api_key_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--api-key-file {api_key_file}: {getattr(exc, 'strerror', None) or exc}") from None
    keys = tuple(k.strip() for line in text.splitlines() for k in line.split(",") if k.strip())
    if not keys:
        raise ValueError(f"--api-key-file {api_key_file} holds no key")
    return keys
