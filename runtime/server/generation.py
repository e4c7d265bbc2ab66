"""One API request in the engine: admission against the queue bound, its sequences, disconnects.

A request with p prompts and n choices runs as p * n engine requests `{id}-{i}`, each read by its own
task into one queue, so that choices stream in whatever order the engine finishes them. Cancelling the
tasks closes the engine streams, and AsyncEngine aborts a stream that closes early: its KV blocks are
freed at the next step. Each task gives its admission slot back when it ends, however it ends. When the
shutdown timeout expires, `expire()` makes a request still waiting for outputs end with a 503.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

from llmctl.runtime.async_engine import AsyncEngine, EngineDeadError, RequestFailedError
from llmctl.runtime.llm import expand_n
from llmctl.runtime.outputs import RequestOutput
from llmctl.runtime.sampling_params import SamplingParams
from llmctl.runtime.server.errors import APIError
from llmctl.runtime.server.metrics import Metrics
from llmctl.runtime.server.protocol import GenerationRequest

log = logging.getLogger("llmctl.server")


class ClientGone(Exception):
    """The client closed the connection before its response was ready."""


class Admission:
    """Sequences admitted and not finished. Touched only on the event loop, so a plain int is enough."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_flight = 0

    def try_admit(self, k: int) -> bool:
        if self.in_flight + k > self.capacity:
            return False
        self.in_flight += k
        return True

    def release(self, k: int = 1) -> None:
        self.in_flight -= k


def api_error(exc: BaseException) -> APIError:
    """What a failed sequence means for the client."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValueError):  # the engine refused the request: prompt too long, bad token ids, ...
        return APIError(400, str(exc))
    if isinstance(exc, EngineDeadError):
        return APIError(500, "the engine has stopped; this server is restarting", code="engine_dead")
    if isinstance(exc, RequestFailedError):  # logged by the engine with its traceback; the others run on
        return APIError(500, "this request failed in the engine (the server log has the details); the "
                             "server goes on serving", code="request_failed")
    log.error("request failed", exc_info=exc)
    return APIError(500, "internal server error", code="internal_error")


def best_of_params(request: GenerationRequest) -> SamplingParams:
    """What the engine runs for a request: best_of sequences per prompt, each with its chosen tokens'
    logprobs (which rank them) whether or not the client asked for logprobs."""
    params = request.params
    if request.best_of == params.n:
        return params
    return replace(params, n=request.best_of, logprobs=params.logprobs or 0)


def best_of(finals: list[RequestOutput], n: int, generated: int) -> list[RequestOutput]:
    """Of each prompt's `generated` sequences, the n with the highest total logprob, most likely first."""
    if generated == n:
        return finals
    best = []
    for p in range(0, len(finals), generated):
        group = finals[p: p + generated]
        best += sorted(group, key=lambda out: sum(out.logprobs), reverse=True)[:n]
    return best


SHUTDOWN_EXPIRED = APIError(503, "the server is shutting down and this request did not finish within its "
                                  "shutdown timeout; retry it elsewhere", code="server_shutting_down")


class Generation:
    def __init__(self, engine: AsyncEngine, prompts: list[list[int]], params: SamplingParams, request_id: str,
                 admission: Admission, metrics: Metrics, running: set[Generation], cache_salt: str | None = None,
                 priority: int = 0) -> None:
        """Takes over len(prompts) * n admitted slots, which its tasks give back as they end; it is in
        `running` until cancelled (every way a response ends cancels it)."""
        subs = expand_n(params)
        self.metrics = metrics
        self._running = running
        running.add(self)
        self.num_choices = len(prompts) * len(subs)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks = []
        for p, prompt in enumerate(prompts):
            for j, sub in enumerate(subs):
                i = p * len(subs) + j
                stream = engine.generate(prompt, sub, f"{request_id}-{i}", cache_salt=cache_salt, priority=priority)
                task = asyncio.create_task(self._pump(i, stream))
                task.add_done_callback(lambda _: admission.release())
                self._tasks.append(task)

    async def _pump(self, i: int, stream: AsyncIterator[RequestOutput]) -> None:
        previous = None
        finished = False
        try:
            async for out in stream:
                now = time.monotonic()
                self.metrics.on_output(out, previous, now)
                previous, finished = now, out.finished
                self._queue.put_nowait((i, out))
        except asyncio.CancelledError:
            if not finished:
                self.metrics.on_finish("abort")
            raise
        except Exception as exc:  # handed to the reader, which answers for the whole request
            self._queue.put_nowait((i, exc))

    async def _next(self) -> tuple[int, RequestOutput]:
        i, item = await self._queue.get()
        if isinstance(item, BaseException):
            raise api_error(item)
        return i, item

    def expire(self) -> None:
        """The shutdown timeout is over: whoever waits for this request's next output gets a 503."""
        self._queue.put_nowait((-1, SHUTDOWN_EXPIRED))

    async def first_outputs(self) -> list[tuple[int, RequestOutput]]:
        """Wait for every choice's first output, so that a bad request gets its 400 before a stream starts."""
        buffered, started = [], set()
        while len(started) < self.num_choices:
            i, out = await self._next()
            buffered.append((i, out))
            started.add(i)
        return buffered

    async def final_outputs(self) -> list[RequestOutput]:
        finals: list[RequestOutput | None] = [None] * self.num_choices
        for _ in range(self.num_choices):
            i, out = await self._next()
            while not out.finished:
                i, out = await self._next()
            finals[i] = out
        return finals

    async def stream(self, buffered: list[tuple[int, RequestOutput]]
                     ) -> AsyncIterator[tuple[int, RequestOutput]]:
        left = self.num_choices
        for i, out in buffered:
            left -= out.finished
            yield i, out
        while left:
            i, out = await self._next()
            left -= out.finished
            yield i, out

    def cancel(self) -> None:
        self._running.discard(self)
        for task in self._tasks:
            task.cancel()


async def until_disconnected(receive: Callable, work: Awaitable):
    """Run work, but raise ClientGone as soon as the client hangs up (the body has been read already, so
    the next message the server can receive is the disconnect)."""
    job = asyncio.ensure_future(work)
    gone = asyncio.create_task(_disconnect(receive))
    try:
        await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not job.done():
            raise ClientGone
        return job.result()
    finally:
        job.cancel()
        gone.cancel()


async def _disconnect(receive: Callable) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
