"""The live progress line of `llmctl bench serve`, read from the records the locust processes append.

Each process writes one JSON line per finished request (line-buffered) into the run's directory, and the one
that drives the run (the master, or the only process) writes STARTED_FILE with the wall-clock time the load
began; the CLI's process reads both while it waits for locust, so it needs no channel into locust and never
imports it. The line shows requests
done (of the total, warm-up included, when there is a count), the time run (of the duration), the errors so
far and the throughput over the last WINDOW seconds.
"""

from __future__ import annotations

import glob
import json
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from llmctl.bench.profiles import Profile

STARTED_FILE = "started"
WINDOW = 5.0  # seconds of finished requests that make the current throughput
PLAIN_EVERY = 10.0  # seconds between lines where stderr is not a terminal (a CI log)


class Progress:
    def __init__(self, out_dir: str | Path, profile: Profile) -> None:
        self.out_dir, self.profile = Path(out_dir), profile
        self.done = self.errors = 0
        self.started: float | None = None
        self.recent: deque[tuple[float, int]] = deque()  # (end, output tokens) of requests that succeeded
        self.read: dict[str, int] = {}  # bytes of each records file taken in, up to its last whole line

    def poll(self) -> None:
        """Take in the lines written since the last look; a line still being written waits for its end."""
        if self.started is None and (self.out_dir / STARTED_FILE).is_file():
            self.started = float((self.out_dir / STARTED_FILE).read_text())
        for path in glob.glob(os.path.join(self.out_dir, "records-*.jsonl")):
            with open(path, "rb") as f:
                f.seek(self.read.get(path, 0))
                data = f.read()
            whole = data[: data.rfind(b"\n") + 1]
            self.read[path] = self.read.get(path, 0) + len(whole)
            for line in whole.splitlines():
                self._add(json.loads(line))

    def _add(self, record: dict) -> None:
        self.done += 1
        if record["status"] != "ok":
            self.errors += 1
        else:
            self.recent.append((record["start"] + (record["e2e"] or 0.0), record["output_tokens"] or 0))

    def line(self, now: float | None = None) -> str:
        now = time.time() if now is None else now
        p = self.profile
        total = p.requests + p.warmup if p.requests is not None else None
        parts = [f"{self.done}/{total} requests" if total else f"{self.done} requests",
                 f"{self.errors} error{'' if self.errors == 1 else 's'}"]
        if self.started is not None:
            ran = max(0.0, now - self.started)
            parts.append(f"{ran:.0f}s / {p.duration:g}s" if p.duration else f"{ran:.0f}s")
            span = min(WINDOW, ran)
            ends = [tokens for end, tokens in self.recent if now - span < end <= now]
            if span > 0 and self.done:
                parts.append(f"{len(ends) / span:.1f} req/s, {sum(ends) / span:,.0f} tok/s")
        while self.recent and self.recent[0][0] <= now - WINDOW:
            self.recent.popleft()
        return " · ".join(parts)


class Ticker:
    """Shows a Progress on a stream: one line updated in place on a terminal, else a plain line every
    `every` seconds; `close()` leaves the last state on a line of its own."""

    def __init__(self, progress: Progress, stream: TextIO, tty: bool, every: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.progress, self.stream, self.tty, self.clock = progress, stream, tty, clock
        self.every = PLAIN_EVERY if every is None else every
        self.last = clock()

    def tick(self) -> None:
        self.progress.poll()
        if self.tty:
            self._write(f"\r{self.progress.line()}\x1b[K")
        elif self.clock() - self.last >= self.every:
            self.last = self.clock()
            self._write(self.progress.line() + "\n")

    def close(self) -> None:
        self.progress.poll()
        self._write(f"\r{self.progress.line()}\x1b[K\n" if self.tty else self.progress.line() + "\n")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
