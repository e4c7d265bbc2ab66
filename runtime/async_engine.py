"""The streaming API for servers: the engine steps in its own thread, requests stream on the event loop.

Requests and aborts reach the engine thread through a queue, so only that thread touches the
scheduler; outputs travel back to each request's asyncio queue with `call_soon_threadsafe`. A
consumer that stops listening (client gone, task cancelled) aborts its request, which frees its
KV blocks at the start of the next step.

A request that the engine ended with an error (a fault in work for it alone) raises RequestFailedError
in its stream, and the loop serves the others on; a step that raises kills the loop, and every stream
gets EngineDeadError. `stalled_for()` tells a health check how long pending work has gone without a
completed step, from plain attributes the loop writes, so the event loop can call it at any time.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from llmctl.runtime.config import EngineConfig
from llmctl.runtime.outputs import RequestOutput
from llmctl.runtime.sampling_params import SamplingParams

IDLE_WAIT_SECONDS = 0.05
log = logging.getLogger("llmctl.engine")


class EngineDeadError(RuntimeError):
    """The engine loop has stopped; no request can be served any more."""


class RequestFailedError(RuntimeError):
    """The engine ended this request with an error; the other requests and the engine go on."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    def __init__(self, config: EngineConfig, engine=None) -> None:
        if engine is None:
            from llmctl.runtime.engine import Engine

            engine = Engine(config, stream=True)
        self.engine = engine
        self.error: BaseException | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stopping = False
        # For stalled_for(): whether the loop is waiting for work, and when it last made progress (a step
        # completed, or work arrived after an idle spell). Single writes of a bool and a float: no lock.
        self._idle = True
        self._progress_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="llmctl-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def shutdown(self, timeout: float | None = None) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    def stalled_for(self) -> float:
        """Seconds that pending work (unfinished requests or a command not yet taken) has waited for the
        loop: since the last completed step, or since the work arrived if the loop was idle; 0.0 without
        pending work."""
        if self._idle and self._commands.empty():
            return 0.0
        return max(0.0, time.monotonic() - self._progress_at)

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str,
                       cache_salt: str | None = None, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Stream one sequence's outputs; ValueError for a bad request, RequestFailedError when the engine
        ended it with an error, EngineDeadError once the loop died. Only requests with the same cache_salt
        share prefix-cache blocks."""
        if not self.alive:
            raise EngineDeadError(f"the engine loop has stopped: {self.error!r}")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        # Stamped here, not in the engine thread: TTFT and E2E include the hand-over and tokenizing.
        self._submit(("add", (prompt, params, request_id, time.monotonic(), cache_salt, priority)))
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._submit(("abort", request_id))

    def _submit(self, command: tuple) -> None:
        if self._idle:  # work arrives after an idle spell: the wait for progress starts now
            self._progress_at = time.monotonic()
        self._commands.put(command)
        self._wake.set()

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "abort":
                self.engine.abort(payload)
                continue
            prompt, params, request_id, arrival_time, cache_salt, priority = payload
            try:
                self.engine.add_request(prompt, params, request_id, arrival_time, cache_salt, priority)
            except Exception as exc:  # a bad request must fail alone, never the loop that serves the others
                self._deliver(request_id, exc)

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drain_commands()
                if not self.engine.has_unfinished():
                    self._idle = True
                    self._wake.wait(IDLE_WAIT_SECONDS)
                    self._wake.clear()
                    continue
                self._idle = False
                outputs = self.engine.step()
                self._progress_at = time.monotonic()
                for out in outputs:
                    self._deliver(out.request_id, out if out.error is None else
                                  RequestFailedError(f"request {out.request_id} failed: {out.error}"))
        except BaseException as exc:  # the loop must report any failure to every waiting request
            self.error = exc
            dead = EngineDeadError(f"the engine loop failed: {exc!r}")
            for request_id in list(self._streams):
                self._deliver(request_id, dead)
            log.exception("engine loop failed; no further requests can be served")
