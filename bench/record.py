"""One streamed request, measured: an incremental parser of OpenAI server-sent events that timestamps each
token-bearing event as its line arrives, and the `Record` it leaves behind.

The locust user feeds it lines straight off the socket with `time.perf_counter()` taken on arrival; it never
waits for the whole body. A token is an event whose text (completions) or delta content (chat) is non-empty;
servers that pack several tokens into one event make fewer, longer gaps, and the server's `usage` (asked for
with `stream_options.include_usage`) then still gives the true token count for TPOT.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields

OK = "ok"


@dataclass
class Record:
    id: int
    start: float  # wall-clock seconds (time.time()) when sent: lines up processes on one timeline
    status: str = OK  # ok, http_<code>, timeout, connection, stream_error, incomplete
    error: str = ""
    ttft: float | None = None  # seconds to the first token
    itl: list[float] = field(default_factory=list)  # every gap between token events, seconds
    e2e: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    tokens_from: str = ""  # usage (the server's), tokenizer, events
    events: int = 0  # token-bearing events seen
    lag: float = 0.0  # open loop: seconds sent after its scheduled arrival
    step: int = 0  # a stepped profile's step
    offered_rate: float | None = None
    warmup: bool = False
    text: str | None = None  # kept only when the server gave no usage, to count tokens afterwards

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (E2E - TTFT) / (tokens - 1)."""
        if self.ttft is None or self.e2e is None or not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def to_json(self) -> str:
        # Shallow on purpose: asdict() deep-copies the ITL list, a large share of the generator's CPU.
        return json.dumps({f.name: getattr(self, f.name) for f in FIELDS}, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict) -> Record:
        return cls(**data)


FIELDS = fields(Record)
_decode = json.JSONDecoder().decode  # str in: json.loads(bytes) spends a tenth of its time sniffing the encoding


class StreamTimer:
    """Feed it every line of an SSE body with its arrival time; `finish()` fills the record."""

    def __init__(self, record: Record, started: float) -> None:
        self.record, self.started = record, started
        self.token_times: list[float] = []
        self.text: list[str] = []
        self.usage: dict | None = None
        self.done = False  # saw [DONE] or a finish_reason: the stream ended on purpose

    def feed(self, line: bytes, now: float) -> None:
        if not line.startswith(b"data:"):
            return  # blank separators, comments, `event:` / `id:` fields
        data = line[5:].strip()
        if data == b"[DONE]":
            self.done = True
            return
        try:
            obj = _decode(data.decode())
        except ValueError as exc:
            raise StreamError(f"not JSON: {data[:80]!r}") from exc
        if obj.get("error"):
            error = obj["error"]
            raise StreamError(str(error.get("message", error) if isinstance(error, dict) else error))
        if obj.get("usage"):
            self.usage = obj["usage"]
        for choice in obj.get("choices") or ():
            delta = choice.get("delta") or {}
            text = choice.get("text") or delta.get("content") or delta.get("reasoning_content") or ""
            if text:
                self.token_times.append(now)
                self.text.append(text)
            if choice.get("finish_reason"):
                self.done = True

    def finish(self, now: float) -> Record:
        r = self.record
        r.e2e = now - self.started
        r.events = len(self.token_times)
        if self.token_times:
            r.ttft = self.token_times[0] - self.started
            r.itl = [b - a for a, b in zip(self.token_times, self.token_times[1:])]
        if self.usage and self.usage.get("completion_tokens") is not None:
            r.output_tokens, r.tokens_from = self.usage["completion_tokens"], "usage"
            r.prompt_tokens = self.usage.get("prompt_tokens", r.prompt_tokens)
        else:
            r.output_tokens, r.tokens_from, r.text = r.events, "events", "".join(self.text)
        if not self.done:
            r.status, r.error = "incomplete", "the stream ended without [DONE] or a finish_reason"
        elif not self.token_times and not r.output_tokens:
            r.status, r.error = "incomplete", "the stream carried no tokens"
        return r


class StreamError(Exception):
    """The server said something that is not a well-formed token stream."""
