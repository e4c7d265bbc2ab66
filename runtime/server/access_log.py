"""Structured access logs: one line per request, written as its response ends.

The request id comes from the client's X-Request-Id when it sends a sane one (so that a trace can follow
a request across proxies), else it is generated; the response echoes it. Route handlers add fields (token
counts, the prompt when asked for) to `request.state.access`, a dict that this middleware logs.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone

REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")  # nothing that could forge a log line or a header
CLIP_CHARS = 256  # a client-chosen value logged or quoted back is cut to this many characters
access_log = logging.getLogger("llmctl.access")


def clip(value: str | None, limit: int = CLIP_CHARS) -> str | None:
    """A client-chosen string, short enough for a log line or an error message, and encodable (a lone
    surrogate becomes its escape)."""
    if value is None:
        return value
    short = value if len(value) <= limit else f"{value[:limit]}...({len(value)} characters)"
    return short if short.isascii() else short.encode("utf-8", "backslashreplace").decode("utf-8")


def _escape(value) -> str:
    """A field for a text log line: control characters (a newline would forge a line) as escapes."""
    text = str(value)
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


class AccessLog:
    def __init__(self, app, on_end: Callable[[str, str, int], None] | None = None) -> None:
        self.app = app
        self.on_end = on_end  # (method, path, status) of every response, when it is logged

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        sent = dict((k.lower(), v) for k, v in scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = sent if REQUEST_ID.fullmatch(sent) else uuid.uuid4().hex
        info = {"request_id": request_id, "method": scope["method"], "path": scope["path"], "status": 500,
                "client": scope["client"][0] if scope.get("client") else None}
        scope.setdefault("state", {})["access"] = info

        logged = False

        def log() -> None:
            nonlocal logged
            if not logged:
                logged = True
                info["latency_ms"] = round((time.perf_counter() - start) * 1000, 3)
                access_log.info("request", extra={"fields": info})
                if self.on_end is not None:
                    self.on_end(info["method"], info["path"], info["status"])

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                info["status"] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                log()  # before the last bytes leave: a client that has its response can already find the line
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log()  # a response that never ended: the client left, or the app failed


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
        line = {"time": when, "level": record.levelname.lower(), "logger": record.name,
                "message": record.getMessage()}
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """For a terminal: the message, then the fields as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        fields = "".join(f" {k}={_escape(v)}" for k, v in getattr(record, "fields", {}).items())
        line = f"{self.formatTime(record)} {record.levelname:<7} {record.name}: {_escape(record.getMessage())}{fields}"
        return line + (f"\n{self.formatException(record.exc_info)}" if record.exc_info else "")


def configure(log_format: str) -> None:
    """Route every logger (ours, uvicorn's) through one handler in the chosen format."""
    handler = logging.StreamHandler()
    handler.setFormatter(JSONFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
