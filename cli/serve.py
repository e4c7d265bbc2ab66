"""`llmctl serve`: the OpenAI-compatible HTTP server on the runtime engine."""

from __future__ import annotations

from pathlib import Path

import typer

from llmctl.cli.console import fail

REFERENCE_MODEL_NAME = "llmctl-reference"


def serve(
    model: str = typer.Argument(None, help="Model directory (default: the embedded reference model).",
                                envvar="LLMCTL_MODEL", show_default=False),
    host: str = typer.Option("0.0.0.0", envvar="LLMCTL_HOST", help="Address to listen on."),
    port: int = typer.Option(8000, envvar="LLMCTL_PORT", help="Port to listen on.", min=0, max=65535),
    api_key: str = typer.Option(None, envvar="LLMCTL_API_KEY", show_default=False,
                                help="Require 'Authorization: Bearer <key>' on /v1/* (default: no key)."),
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
                                           help="Seconds in-flight requests get to finish after SIGTERM."),
    max_body_bytes: int = typer.Option(8 << 20, envvar="LLMCTL_MAX_BODY_BYTES", min=1,
                                       help="Largest request body accepted; larger ones get 413."),
    dtype: str = typer.Option("auto", envvar="LLMCTL_DTYPE", help="auto, float16, bfloat16 or float32."),
    device: str = typer.Option("auto", envvar="LLMCTL_DEVICE", help="auto, cuda or cpu."),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (completions, chat, models, health, metrics)."""
    try:
        from llmctl.runtime.async_engine import AsyncEngine
        from llmctl.runtime.config import EngineConfig
        from llmctl.runtime.llm import default_model
        from llmctl.runtime.server.launch import run
        from llmctl.runtime.server.settings import ServerSettings

        name = served_model_name or (Path(model).resolve().name if model else REFERENCE_MODEL_NAME)
        settings = ServerSettings(served_model_name=name, host=host, port=port,
                                  api_keys=tuple(k.strip() for k in api_key.split(",")) if api_key else (),
                                  max_queue_len=max_queue_len, log_format=log_format,
                                  log_prompts=log_prompts, shutdown_timeout=shutdown_timeout,
                                  max_body_bytes=max_body_bytes)
        config = EngineConfig(model=model or default_model(), dtype=dtype, device=device,
                              max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                              gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len)
        engine = AsyncEngine(config)
    except ImportError as exc:
        fail(f"{exc.name or exc} is missing: install the server's dependencies, `pip install llmctl[serve]`")
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    code = run(engine, settings)
    if code:
        fail("the engine failed; see the log above", code)
