"""Connections before they are requests: a deadline for each request head, a cap on open connections, and
accept() errors logged once per interval.

uvicorn waits for a request head as long as the client cares to send it (its keep-alive timer starts only
after a response) and accepts connections until the process runs out of descriptors. A few hundred
clients that trickle bytes, or send nothing, would hold every descriptor; asyncio then logs each failed
accept(), thousands of lines a second. So:

- A request head must be complete within `header_timeout`, counted from the connection's start for its
  first request, and from the first byte of the next one on a keep-alive connection (an idle keep-alive
  connection is uvicorn's to close, after `keep_alive_timeout`). Late: a 408 if part of a head came,
  else the connection is just closed. The rest of a body the app answered without reading must come
  within `keep_alive_timeout` of the response, else the connection is closed.
- At most `max_connections` are open; one more is answered 503 at once and closed, so that its descriptor
  is free again before it is read from.
- A head over `HEAD_LIMIT` bytes is answered 431 and closed, before it grows any further.
- `install()` logs running out of descriptors on accept() once per `LOG_INTERVAL`, with a count.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import re
import time
from collections.abc import Callable

import h11
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

from llmctl.runtime.server.errors import APIError
from llmctl.runtime.server.settings import ServerSettings

HEAD_LIMIT = 16 << 10  # bytes of request line and headers: h11's own default, stated so that it stays
LOG_INTERVAL = 5.0  # seconds between two warnings about the same flood
HEAD_END = re.compile(rb"\n\r?\n")  # the blank line after the headers, as h11 finds it
ACCEPT_FAILED = "socket.accept() out of system resource"  # asyncio's message for the errors below
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
log = logging.getLogger("llmctl.server")


def uvicorn_options(settings: ServerSettings) -> dict:
    """Keyword arguments for uvicorn.Config that enforce the settings' connection limits.

    Not uvicorn's `limit_concurrency`: it refuses requests, not connections (a client that never completes
    a head is never refused, and one over the limit keeps its descriptor until its head is read), and it
    counts running request tasks too, which a streaming server has many of by design and which outlive a
    client that left. Work is bounded by admission (429); this bounds descriptors.
    """
    refused = Throttle("refused connections over the cap; each got a 503",
                       {"max_connections": settings.max_connections})
    protocol = type(LimitedH11Protocol.__name__, (LimitedH11Protocol,),
                    {"header_timeout": settings.header_timeout, "max_connections": settings.max_connections,
                     "retry_after": str(settings.retry_after).encode(), "refused": refused})
    return {"http": protocol, "timeout_keep_alive": settings.keep_alive_timeout,
            "h11_max_incomplete_event_size": HEAD_LIMIT}


def install(loop: asyncio.AbstractEventLoop) -> None:
    """Call on the serving loop before it accepts connections."""
    loop.set_exception_handler(AcceptErrors(loop.get_exception_handler()))


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus deadlines for what a client still owes and a cap on open connections.
    `uvicorn_options` subclasses it with one server's limits."""

    header_timeout: float
    max_connections: int
    retry_after: bytes
    refused: Throttle
    owed: str | None = None  # what the running deadline is for: "head", or "body" that nothing will read
    deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self.connections.discard(self)
            self.refused.note()
            self._answer_and_close(503, f"the server holds its maximum of {self.max_connections} connections; "
                                        "retry shortly", "too_many_connections", ((b"retry-after", self.retry_after),))
        else:
            self._start_deadline("head")

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_client()

    def handle_events(self) -> None:
        # h11 limits only a head that is still incomplete: one that arrives whole in a single read (asyncio
        # reads up to 256 KiB) would be parsed, whatever its size.
        if self.conn.their_state is h11.IDLE:
            buffered = self.conn.trailing_data[0]
            if len(buffered) > HEAD_LIMIT and not HEAD_END.search(buffered, 0, HEAD_LIMIT):
                self._answer_and_close(431, f"the request line and headers exceed {HEAD_LIMIT} bytes",
                                       "request_header_too_large")
                return
        super().handle_events()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_client()  # a pipelined head may be parsed now, or be there in part

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._stop_deadline()

    def _watch_client(self) -> None:
        """One deadline, for bytes the client owes that nothing else times: the rest of a head once it has
        begun, or the rest of a body whose response is already complete (the app answered without reading
        it, and uvicorn's keep-alive timer stops at its first byte)."""
        if self.transport.is_closing():
            owed = None
        elif self.conn.their_state is h11.IDLE:
            owed = "head" if self.owed == "head" or self.conn.trailing_data[0] else None
        elif self.conn.their_state is h11.SEND_BODY and self.conn.our_state is h11.DONE:
            owed = "body"
        else:
            owed = None
        if owed != self.owed:
            self._stop_deadline()
            if owed is not None:
                self._start_deadline(owed)

    def _start_deadline(self, owed: str) -> None:
        seconds = self.header_timeout if owed == "head" else self.timeout_keep_alive
        self.owed, self.deadline = owed, self.loop.call_later(seconds, self._deadline_passed)

    def _stop_deadline(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        self.owed = self.deadline = None

    def _deadline_passed(self) -> None:
        owed, self.owed, self.deadline = self.owed, None, None
        if self.transport.is_closing():
            return
        if owed == "head" and self.conn.trailing_data[0]:
            self._answer_and_close(408, f"the request head did not arrive within {self.header_timeout:g} s",
                                   "request_timeout")
        else:
            self.transport.close()  # connection_lost tells h11

    def _answer_and_close(self, status: int, message: str, code: str,
                          headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        """A response of our own, before (or instead of) any request: h11 allows one while it is IDLE."""
        if self.conn.our_state is not h11.IDLE:
            self.transport.close()
            return
        body = json.dumps(APIError(status, message, code=code).body()).encode()
        head = [*self.server_state.default_headers, (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()), (b"connection", b"close"), *headers]
        output = self.conn.send(h11.Response(status_code=status, headers=head, reason=STATUS_PHRASES[status]))
        output += self.conn.send(h11.Data(data=body)) + self.conn.send(h11.EndOfMessage())
        self.transport.write(output)
        self.transport.close()  # after the write buffer drains


class Throttle:
    """One WARNING per interval for something that may happen thousands of times a second; each line
    counts the occurrences left out since the one before."""

    def __init__(self, message: str, fields: dict | None = None, interval: float = LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.message, self.fields, self.interval, self.clock = message, fields or {}, interval, clock
        self.next_line = -math.inf
        self.suppressed = 0

    def note(self, **fields) -> None:
        now = self.clock()
        if now < self.next_line:
            self.suppressed += 1
            return
        log.warning(self.message, extra={"fields": {**self.fields, **fields, "suppressed": self.suppressed}})
        self.next_line, self.suppressed = now + self.interval, 0


class AcceptErrors:
    """A loop exception handler: accept() failing for want of descriptors or memory goes through a
    Throttle (asyncio retries the accept a second later); every other context goes on unchanged to the
    handler that was there before, or to asyncio's default."""

    def __init__(self, previous: Callable | None, interval: float = LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.previous = previous
        self.throttle = Throttle("accept() fails: out of descriptors or memory; new connections wait in "
                                 "the listen queue", interval=interval, clock=clock)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc, message = context.get("exception"), context.get("message", "")
        resources = isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS
        if message == ACCEPT_FAILED or (resources and "accept" in message):
            self.throttle.note(error=errno.errorcode[exc.errno] if resources else None)
        elif self.previous is not None:
            self.previous(loop, context)
        else:
            loop.default_exception_handler(context)
