"""The app on uvicorn, with the two ways a server ends.

SIGTERM or Ctrl-C: uvicorn stops accepting connections, lets in-flight requests finish for up to
`shutdown_timeout` seconds, cancels the rest (which aborts them in the engine), and we exit 0.
Engine failure: in-flight requests have their 500s already; a watchdog notices the dead loop, stops the
server the same way, and we exit 1, so that an orchestrator restarts the process instead of routing
traffic to a server that can only fail.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading

import uvicorn

from llmctl.runtime.async_engine import AsyncEngine
from llmctl.runtime.server import connections
from llmctl.runtime.server.access_log import configure
from llmctl.runtime.server.app import build_app
from llmctl.runtime.server.settings import ServerSettings

WATCHDOG_INTERVAL = 0.2  # seconds between checks that the engine loop still runs
ENGINE_STOP_TIMEOUT = 10.0
log = logging.getLogger("llmctl.server")


def uvicorn_server(engine: AsyncEngine, settings: ServerSettings) -> uvicorn.Server:
    config = uvicorn.Config(build_app(engine, settings), host=settings.host, port=settings.port,
                            log_config=None, access_log=False, lifespan="off",
                            timeout_graceful_shutdown=settings.shutdown_timeout,
                            **connections.uvicorn_options(settings))
    return uvicorn.Server(config)


async def serve(server: uvicorn.Server, engine: AsyncEngine) -> int:
    """Serve until told to stop or until the engine dies; the process's exit code."""
    connections.install(asyncio.get_running_loop())
    watchdog = asyncio.create_task(_watch(server, engine))
    try:
        await server.serve()
    finally:
        watchdog.cancel()
    return 0 if engine.alive else 1


async def _watch(server: uvicorn.Server, engine: AsyncEngine) -> None:
    while engine.alive:
        await asyncio.sleep(WATCHDOG_INTERVAL)
    log.error("the engine loop has stopped; shutting the server down", exc_info=engine.error)
    server.should_exit = True


def run(engine: AsyncEngine, settings: ServerSettings) -> int:
    """Serve from the main thread until SIGTERM / SIGINT (0) or engine failure (1)."""
    configure(settings.log_format)
    server = uvicorn_server(engine, settings)
    restore = {}
    if threading.current_thread() is threading.main_thread():
        # uvicorn handles these signals while it serves, then raises them again for the handlers it found:
        # the default handler would kill us with SIGTERM's status instead of exiting 0 after draining.
        # This one also covers a signal that arrives before uvicorn is listening.
        def stop(signum, frame) -> None:
            server.should_exit = True

        restore = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = asyncio.run(serve(server, engine))
    finally:
        for sig, handler in restore.items():
            signal.signal(sig, handler)
        engine.shutdown(timeout=ENGINE_STOP_TIMEOUT)
    log.info("server stopped", extra={"fields": {"exit_code": code}})
    return code
