"""Connections before they are requests: header and keep-alive timeouts, a cap on open connections, and
accept errors logged once per interval. (Stub: the options below are filled in by the connection work.)"""

from __future__ import annotations

import asyncio

from llmctl.runtime.server.settings import ServerSettings


def uvicorn_options(settings: ServerSettings) -> dict:
    """Keyword arguments for uvicorn.Config that enforce the settings' connection limits."""
    return {"timeout_keep_alive": settings.keep_alive_timeout}


def install(loop: asyncio.AbstractEventLoop) -> None:
    """Call on the serving loop before it accepts connections."""
