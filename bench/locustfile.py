"""The locust side of `llmctl bench serve`. It runs only inside locust's own processes: importing locust
monkey-patches the process with gevent, so the CLI starts `python -m locust -f <this file>` (runner.py) with
LLMCTL_BENCH_PLAN naming the run's plan, and reads back the JSONL records each process writes.

A user sends one streaming request per task over its own keep-alive connection (geventhttpclient) and reads
the body line by line, so each SSE event is timestamped when it arrives rather than when the body ends.
Request numbers ("tickets") are dealt round-robin over the worker processes: ticket i goes to worker
i % workers, the first `warmup` tickets are marked warm-up, and there are `warmup + requests` in all.
"""

from __future__ import annotations

import json
import os
import random
import time
import urllib.parse

import gevent
from geventhttpclient import HTTPClient
from locust import LoadTestShape, User, events, runners, task
from locust.runners import MasterRunner, WorkerRunner

from llmctl.bench.progress import STARTED_FILE
from llmctl.bench.record import Record, StreamError, StreamTimer
from llmctl.bench.runner import Plan

PLAN = Plan.load(os.environ["LLMCTL_BENCH_PLAN"])
PROFILE = PLAN.profile
with open(PLAN.requests_file) as f:
    # (body, prompt tokens, a trace's send time in seconds from the start or None)
    POOL = [(json.dumps(item["body"]).encode(), item["prompt_tokens"], item.get("at")) for item in map(json.loads, f)]
PATH = urllib.parse.urlsplit(PLAN.url).path + PLAN.path  # the client below takes only the URL's host
HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream"}
if os.environ.get("LLMCTL_BENCH_API_KEY"):
    HEADERS["Authorization"] = f"Bearer {os.environ['LLMCTL_BENCH_API_KEY']}"
# The master's shape counts finished requests from the workers' reports; the default 3 s makes it stop late.
runners.WORKER_REPORT_INTERVAL = 1.0


class Process:
    """This process's share of the run: its tickets, its arrival clock and its record file."""

    def begin(self, index: int) -> None:
        self.t0 = time.perf_counter()
        self.next_ticket = index
        self.next_arrival = 0.0
        self.rng = random.Random(PLAN.seed * 1000 + index)
        # Line-buffered: a record is on disk once its request ends, whatever happens to this process later.
        self.file = open(os.path.join(PLAN.out_dir, f"records-{os.getpid()}.jsonl"), "a", buffering=1)  # noqa: SIM115

    def ticket(self) -> int | None:
        i = self.next_ticket
        if PROFILE.requests is not None and i >= PROFILE.requests + PROFILE.warmup:
            return None
        self.next_ticket += PLAN.workers
        return i

    def arrival(self, i: int) -> float:
        """perf_counter() time of this process's next open-loop arrival, ticket i's (a trace's own time)."""
        if PROFILE.kind == "trace":
            return self.t0 + POOL[i % len(POOL)][2]
        due = self.next_arrival
        self.next_arrival += PROFILE.gap(due, 1.0 / PLAN.workers, self.rng)
        return self.t0 + due

    def write(self, record: Record) -> None:
        self.file.write(record.to_json() + "\n")

    def close(self) -> None:
        if getattr(self, "file", None) and not self.file.closed:
            self.file.close()


PROC = Process()


@events.test_start.add_listener
def _begin(environment, **_) -> None:
    runner = environment.runner
    if not isinstance(runner, WorkerRunner):  # the one process that drives the run: the load begins now
        started = os.path.join(PLAN.out_dir, STARTED_FILE)
        with open(started + ".tmp", "w") as f:
            f.write(repr(time.time()))
        os.replace(started + ".tmp", started)  # whole or absent for the CLI's progress line
    if not isinstance(runner, MasterRunner):
        PROC.begin(runner.worker_index if isinstance(runner, WorkerRunner) else 0)


@events.test_stop.add_listener
@events.quitting.add_listener
def _end(environment, **_) -> None:
    PROC.close()


class StreamingUser(User):
    _pending = 0.0

    def wait_time(self) -> float:
        # Sleeping through User.wait() lets locust stop a user that waits for its arrival at once, while one
        # with a request in flight finishes it (--stop-timeout): no request is cut off and left unrecorded.
        pending, self._pending = self._pending, 0.0
        return pending

    def on_start(self) -> None:
        self.client = self._connect()

    def on_stop(self) -> None:
        self.client.close()

    def _connect(self) -> HTTPClient:
        return HTTPClient.from_url(PLAN.url, concurrency=1, connection_timeout=PLAN.timeout,
                                   network_timeout=PLAN.timeout, headers=HEADERS)

    @task
    def send(self) -> None:
        i = PROC.ticket()
        if i is None:  # this process's share is done: idle until the shape stops the run
            self._pending = 3600.0
            self.wait()
            return
        due = PROC.arrival(i) if PROFILE.open_loop and not PLAN.web else None
        if due is not None:
            self._pending = max(0.0, due - time.perf_counter())
            self.wait()
        record = self.measure(i, due)
        PROC.write(record)
        name = PLAN.path + (" (warm-up)" if record.warmup else "")
        self.environment.events.request.fire(
            request_type="POST", name=name, response_time=(record.e2e or 0) * 1000, response_length=record.events,
            exception=None if record.ok else Exception(f"{record.status}: {record.error}"), context={})
        if record.ok and record.ttft is not None:
            self.environment.events.request.fire(request_type="TTFT", name=name, response_time=record.ttft * 1000,
                                                 response_length=0, exception=None, context={})

    def measure(self, i: int, due: float | None) -> Record:
        body, prompt_tokens, _ = POOL[i % len(POOL)]
        t = time.perf_counter() - PROC.t0
        record = Record(id=i, start=time.time(), prompt_tokens=prompt_tokens, warmup=i < PROFILE.warmup,
                        step=PROFILE.step(t), offered_rate=PROFILE.rate_at(t) if PROFILE.open_loop else None)
        started = time.perf_counter()
        record.lag = 0.0 if due is None else started - due
        timer = StreamTimer(record, started)
        try:
            with gevent.Timeout(PLAN.timeout):
                response = self.client.request("POST", PATH, body=body)
                if response.status_code != 200:
                    record.status, record.error = f"http_{response.status_code}", _reason(response.read())
                    record.e2e = time.perf_counter() - started
                    return record
                while line := response.readline(b"\n"):
                    timer.feed(line, time.perf_counter())
            return timer.finish(time.perf_counter())
        except gevent.Timeout:
            record.status, record.error = "timeout", f"no complete answer in {PLAN.timeout:g}s"
        except StreamError as exc:
            record.status, record.error = "stream_error", str(exc)
        except Exception as exc:  # whatever the socket or the HTTP parser raised: the request failed
            record.status, record.error = "connection", f"{type(exc).__name__}: {exc}"
        record.e2e = time.perf_counter() - started
        self.client.close()  # the connection is in an unknown state: start the next request on a fresh one
        self.client = self._connect()
        return record


def _reason(body: bytes) -> str:
    try:
        error = json.loads(body)
        error = error.get("error", error.get("detail", error)) if isinstance(error, dict) else error
        return str(error.get("message", error) if isinstance(error, dict) else error)[:300]
    except ValueError:
        return body[:300].decode("utf-8", "replace")


def _finished(runner) -> int:
    """Requests finished (any status, warm-up included) so far, over all processes."""
    return sum(e.num_requests for (name, method), e in runner.stats.entries.items() if method == "POST")


class Shape(LoadTestShape):
    """Drives locust from the profile; stops at the duration, at the request count, or (stepped) after the
    first step the server could not keep up with."""

    step_start = (0, 0, 0.0)  # (step, finished requests, time) at the first look into the current step

    def tick(self):
        t, done = self.get_run_time(), _finished(self.runner)
        if PROFILE.over(t) or (PROFILE.requests is not None and done >= PROFILE.requests + PROFILE.warmup):
            return None
        if PROFILE.kind == "stepped" and PROFILE.step(t) != self.step_start[0]:
            step, done_then, t_then = self.step_start
            if PROFILE.saturated(step, done - done_then, t - t_then):
                return None
            self.step_start = (PROFILE.step(t), done, t)
        users = PROFILE.users(t)
        return users, users * 10  # every user within 0.1 s


if PLAN.web:  # locust's UI drives the users instead
    del Shape
