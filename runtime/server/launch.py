"""The app on uvicorn: the model loads behind an open port, and the three ways a server ends.

Start: the port opens at once and the model loads in a thread; until it is in, /ready and /health say
"loading" (503) and /v1/* answers 503, so probes and clients can tell a slow start from a dead one. A
model that fails to load ends the process with exit 1 and the reason.
SIGTERM or Ctrl-C: uvicorn stops accepting connections and /ready turns 503; in-flight requests get up
to `shutdown_timeout` seconds; then every request still running ends itself cleanly (an error event and
[DONE] in a stream, a JSON 503 otherwise) and uvicorn cancels what is left a moment later; exit 0.
Engine failure: in-flight requests have their 500s already; a watchdog notices the dead loop, stops the
server the same way, and we exit 1, so that an orchestrator restarts the process instead of routing
traffic to a server that can only fail.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable

import uvicorn

from llmctl.runtime.async_engine import AsyncEngine
from llmctl.runtime.config import EngineConfig
from llmctl.runtime.server import connections
from llmctl.runtime.server.access_log import configure
from llmctl.runtime.server.app import Server, build_app
from llmctl.runtime.server.settings import ServerSettings

WATCHDOG_INTERVAL = 0.2  # seconds between checks of the engine loop and of a shutdown's start
ENGINE_STOP_TIMEOUT = 10.0
EXPIRY_GRACE = 5.0  # seconds between our requests ending themselves and uvicorn cancelling what is left
log = logging.getLogger("llmctl.server")


def uvicorn_server(engine: AsyncEngine | None, settings: ServerSettings,
                   config: EngineConfig | None = None) -> uvicorn.Server:
    """A server for a loaded engine, or (engine None) for one `serve` will load from `config`."""
    app = build_app(engine, settings, config)
    options = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                             lifespan="off", timeout_graceful_shutdown=settings.shutdown_timeout + EXPIRY_GRACE,
                             **connections.uvicorn_options(settings), **_tls(settings))
    return uvicorn.Server(options)


def _tls(settings: ServerSettings) -> dict:
    """uvicorn's TLS options: none for plain HTTP."""
    if not settings.ssl_certfile:
        return {}
    reqs = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
    return dict(ssl_certfile=settings.ssl_certfile, ssl_keyfile=settings.ssl_keyfile,
                ssl_ca_certs=settings.ssl_ca_certs, ssl_cert_reqs=reqs[settings.client_certs])


def app_server(server: uvicorn.Server) -> Server:
    return server.config.app.state.server


def bind(settings: ServerSettings) -> socket.socket:
    """The listening socket, bound before anything loads: a port in use is one clear error at once, not a log
    line after the model has loaded."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it: a stream's small chunks leave at once, not after a delayed ACK (~40 ms).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}") from None
    return sock


async def serve(server: uvicorn.Server, engine: AsyncEngine | None = None,
                load: Callable[[], AsyncEngine] | None = None, sock: socket.socket | None = None) -> int:
    """Serve until told to stop, until the engine dies or until it fails to load; the process's exit code.
    `load` builds the engine in a thread while the port is open (else `engine` is already loaded); `sock`, a
    bound socket (else uvicorn binds the settings' host and port)."""
    connections.install(asyncio.get_running_loop())
    state = {"engine": engine, "load_error": None}
    tasks = [asyncio.create_task(_watch(server, state, load)), asyncio.create_task(_drain(server))]
    try:
        await server.serve(sockets=[sock] if sock is not None else None)
    finally:
        for task in tasks:
            task.cancel()
    if state["load_error"] is not None:
        raise state["load_error"]
    return 0 if state["engine"] is not None and state["engine"].alive else 1


async def _watch(server: uvicorn.Server, state: dict, load: Callable[[], AsyncEngine] | None) -> None:
    if state["engine"] is None and load is not None:
        start = time.monotonic()
        try:
            state["engine"] = await asyncio.to_thread(load)
        except BaseException as exc:  # reported by serve(), which re-raises it for the caller's one line
            state["load_error"] = exc
            server.should_exit = True
            return
        app_server(server).attach(state["engine"])
        log.info("model loaded; ready", extra={"fields": {
            "model": app_server(server).model_name, "seconds": round(time.monotonic() - start, 1)}})
    engine = state["engine"]
    while engine.alive:
        await asyncio.sleep(WATCHDOG_INTERVAL)
    log.error("the engine loop has stopped; shutting the server down", exc_info=engine.error)
    server.should_exit = True


async def _drain(server: uvicorn.Server) -> None:
    """From the moment a shutdown starts: /ready 503, then, after shutdown_timeout, end what still runs."""
    while not server.should_exit:
        await asyncio.sleep(WATCHDOG_INTERVAL)
    app = app_server(server)
    app.begin_drain()
    await asyncio.sleep(app.settings.shutdown_timeout)
    if app.generations:
        log.warning("shutdown timeout expired; ending the requests still running",
                    extra={"fields": {"requests": len(app.generations)}})
    app.expire()


def run(load: Callable[[], AsyncEngine], settings: ServerSettings, config: EngineConfig) -> int:
    """Serve from the main thread until SIGTERM / SIGINT (0) or engine failure (1); the engine is built by
    `load` once the port is open. A load failure is raised here, after the server has closed."""
    configure(settings.log_format)
    sock = bind(settings)
    host, port = sock.getsockname()[:2]
    log.info("listening; loading the model", extra={"fields": {
        "url": f"{'https' if settings.ssl_certfile else 'http'}://{f'[{host}]' if ':' in host else host}:{port}",
        "model": str(config.model)}})
    server = uvicorn_server(None, settings, config)
    restore = {}
    if threading.current_thread() is threading.main_thread():
        # uvicorn handles these signals while it serves, then raises them again for the handlers it found:
        # the default handler would kill us with SIGTERM's status instead of exiting 0 after draining.
        # This one also covers a signal that arrives before uvicorn is listening.
        def stop(signum, frame) -> None:
            server.should_exit = True

        restore = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    start = time.monotonic()
    try:
        code = asyncio.run(serve(server, load=load, sock=sock))
    finally:
        sock.close()
        for sig, handler in restore.items():
            signal.signal(sig, handler)
        engine = app_server(server).engine
        if engine is not None:
            engine.shutdown(timeout=ENGINE_STOP_TIMEOUT)
    log.info("server stopped", extra={"fields": {"exit_code": code, "seconds": round(time.monotonic() - start, 3)}})
    return code
