"""Property-based fuzzing of the HTTP API: no generated request gets a 5xx, every error is in OpenAI's
shape, and the engine survives all.

A request starts valid (so that many reach the engine: sampling, stops, logprobs, n, streams) and then has
up to two fields, or an unknown one, replaced by any JSON value at all; NaN and Infinity included, since
Python's json module reads them, and text with lone surrogates, which JSON's escapes can carry. The default
suite sends a few hundred; `nox -s slow` sends 5,000 (both routes, streamed and not).
"""

from __future__ import annotations

import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
httpx = pytest.importorskip("httpx")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def text(max_size: int):
    """Unicode text; one string in ten holds a lone surrogate (what `"\\ud800"` in JSON decodes to)."""
    surrogate = st.integers(0xD800, 0xDFFF).map(chr)
    broken = st.tuples(st.text(max_size=max_size // 2), surrogate, st.text(max_size=max_size // 2)).map("".join)
    return st.sampled_from([False] * 9 + [True]).flatmap(lambda bad: broken if bad else st.text(max_size=max_size))


scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | text(8)
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    text(6), inner, max_size=3), max_leaves=8)
token_ids = st.lists(st.integers(0, 511), min_size=1, max_size=12)

COMMON = {
    "model": st.just("tiny"),
    "max_tokens": st.integers(1, 40),
    "temperature": st.floats(0.0, 2.0),
    "top_p": st.floats(0.01, 1.0),
    "top_k": st.integers(-1, 600),
    "min_p": st.floats(0.0, 1.0),
    "n": st.integers(1, 3),
    "stop": text(3) | st.lists(text(3), max_size=3),
    "seed": st.integers(-(2**63), 2**64 - 4),
    "presence_penalty": st.floats(-2.0, 2.0),
    "frequency_penalty": st.floats(-2.0, 2.0),
    "repetition_penalty": st.floats(0.5, 2.0),
    "ignore_eos": st.booleans(),
    "user": text(5),
    "cache_salt": text(4),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
}
COMPLETION = {
    **COMMON,
    "logprobs": st.integers(0, 20),
    "echo": st.booleans(),
    "best_of": st.integers(1, 4),
}
message = st.fixed_dictionaries({
    "role": st.sampled_from(["system", "user", "assistant"]),
    "content": text(30)
    | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text(10)}), max_size=2),
})
CHAT = {
    **COMMON,
    "logprobs": st.booleans(),
    "max_completion_tokens": st.integers(1, 40),
}


@st.composite
def perturbed(draw, required: dict, optional: dict) -> dict:
    body = draw(st.fixed_dictionaries(required, optional=optional))
    names = sorted({*required, *optional, "unknown_field"})
    for name in draw(st.lists(st.sampled_from(names), max_size=2, unique=True)):
        body[name] = draw(anything)
    return body


prompts = text(40) | token_ids | st.lists(text(10), min_size=1, max_size=3) \
    | st.lists(token_ids, min_size=1, max_size=3)
requests = (st.tuples(st.just("/v1/completions"), perturbed({"prompt": prompts}, COMPLETION))
            | st.tuples(st.just("/v1/chat/completions"),
                        perturbed({"messages": st.lists(message, min_size=1, max_size=3)}, CHAT)))


@pytest.fixture(scope="module")
def fuzz_server(chat_model, engine_factory, serve):
    eng = engine_factory(chat_model, max_model_len=64, max_num_seqs=4)
    with serve(eng, max_queue_len=4, max_request_share=1.0) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        yield server, client
    eng.shutdown(timeout=5)


def check(response: httpx.Response, body) -> None:
    assert response.status_code < 500, (body, response.text)
    if response.status_code != 200:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    elif response.headers["content-type"].startswith("text/event-stream"):
        events = [line for line in response.text.split("\n\n") if line]
        assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events), (body, events[-3:])
    else:
        assert response.json()["choices"], body


def send(server, client, request) -> None:
    path, body = request
    raw = json.dumps(body)  # ensure_ascii: a lone surrogate travels as its \\u escape, as a client would send it
    response = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    hypothesis.event(f"{path} {'stream' if body.get('stream') is True else 'json'} {response.status_code}")
    check(response, body)
    assert server.engine.alive


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=requests)
def test_no_generated_request_gets_a_5xx(fuzz_server, request):
    send(*fuzz_server, request)


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=st.lists(requests, min_size=25, max_size=25))
def test_5000_generated_requests_get_no_5xx(fuzz_server, batch):
    """200 examples of 25 requests each: 5,000 requests."""
    for request in batch:
        send(*fuzz_server, request)


@settings(max_examples=60, deadline=None)
@given(raw=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_raw_bodies_get_400s(fuzz_server, raw):
    server, client = fuzz_server
    response = client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code in (200, 400, 404), response.text
    check(response, raw)
