"""The SSE timer: tokens timed as their lines arrive, usage preferred, broken streams named."""

from __future__ import annotations

import json

import pytest

from llmctl.bench.record import Record, StreamError, StreamTimer


def data(obj) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n"


def completion(text, finish=None):
    return {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}


def chat(content=None, finish=None, role=None):
    delta = {k: v for k, v in (("content", content), ("role", role)) if v is not None}
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_completion_stream_with_usage():
    timer = StreamTimer(Record(id=0, start=0.0, prompt_tokens=3), started=10.0)
    for line, t in [(data(completion("a")), 10.2), (b"\n", 10.2), (data(completion("b")), 10.25),
                    (b": keep-alive comment\n", 10.3), (data(completion("c", "length")), 10.4),
                    (data({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 4}}), 10.41),
                    (data(b"[DONE]"), 10.42)]:
        timer.feed(line, t)
    r = timer.finish(10.5)
    assert r.ok and r.ttft == pytest.approx(0.2) and r.e2e == pytest.approx(0.5)
    assert r.itl == pytest.approx([0.05, 0.15])
    assert (r.prompt_tokens, r.output_tokens, r.tokens_from, r.events) == (5, 4, "usage", 3)
    assert r.tpot == pytest.approx(0.3 / 3)
    assert r.text is None


def test_chat_stream_without_done_or_usage_counts_events_and_keeps_the_text():
    """transformers serve ends chat streams at the finish_reason chunk, with no [DONE]."""
    timer = StreamTimer(Record(id=1, start=0.0), started=0.0)
    for line, t in [(data(chat(role="assistant")), 0.1), (data(chat("Hel")), 0.3), (data(chat("lo")), 0.4),
                    (data(chat(finish="stop")), 0.5)]:
        timer.feed(line, t)
    r = timer.finish(0.5)
    assert r.ok and r.ttft == pytest.approx(0.3)  # the role-only chunk is no token
    assert (r.output_tokens, r.tokens_from, r.text) == (2, "events", "Hello")


def test_a_stream_cut_short_is_incomplete_and_an_error_event_raises():
    timer = StreamTimer(Record(id=2, start=0.0), started=0.0)
    timer.feed(data(completion("a")), 0.1)
    r = timer.finish(0.2)
    assert r.status == "incomplete" and not r.ok
    with pytest.raises(StreamError, match="out of memory"):
        StreamTimer(Record(id=3, start=0.0), 0.0).feed(data({"error": {"message": "out of memory"}}), 0.1)
    with pytest.raises(StreamError, match="not JSON"):
        StreamTimer(Record(id=4, start=0.0), 0.0).feed(b"data: {oops\n", 0.1)


def test_record_round_trips_through_json():
    r = Record(id=7, start=1.5, ttft=0.1, itl=[0.01, 0.02], e2e=0.2, output_tokens=3, step=2, warmup=True)
    assert Record.from_dict(json.loads(r.to_json())) == r
