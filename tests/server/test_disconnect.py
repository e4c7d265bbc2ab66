"""A client that goes away aborts its request, and its KV blocks are back in the pool at once."""

from __future__ import annotations

import socket

import pytest

httpx = pytest.importorskip("httpx")

STEP_SECONDS = 0.05  # 100 tokens take 5 s: an abort shows long before a request could finish


def aborted(scrape, server) -> float:
    return scrape(server.url).get('llmctl:request_success_total{finished_reason="abort"}', 0.0)


def test_closing_a_stream_aborts_every_choice(new_engine, serve, slow_steps, idle, scrape):
    eng = new_engine()
    slow_steps(eng, STEP_SECONDS)
    with serve(eng) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        body = {"prompt": "x", "max_tokens": 100, "ignore_eos": True, "stream": True, "n": 3}
        with client.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            assert len(eng.engine.scheduler.running) == 3
        assert idle(eng)
        assert aborted(scrape, server) == 3
        assert server.app.state.server.admission.in_flight == 0


def test_leaving_a_plain_request_aborts_it(new_engine, serve, slow_steps, idle, until, scrape):
    eng = new_engine()
    slow_steps(eng, STEP_SECONDS)
    with serve(eng) as server:
        request = (b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
                   b'Content-Length: %d\r\n\r\n%s')
        body = b'{"prompt": "x", "max_tokens": 100, "ignore_eos": true}'
        with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as sock:
            sock.sendall(request % (len(body), body))
            until(lambda: eng.engine.scheduler.running)
        assert idle(eng)
        assert aborted(scrape, server) == 1


def test_leaving_while_queued_frees_the_slot(new_engine, serve, slow_steps, until, idle):
    """A stream that never got its first token: the client leaves while the request waits in the queue."""
    eng = new_engine(max_num_seqs=1)
    slow_steps(eng, STEP_SECONDS)
    with serve(eng) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        admission = server.app.state.server.admission
        long = {"prompt": "x", "max_tokens": 100, "ignore_eos": True, "stream": True}
        with client.stream("POST", "/v1/completions", json=long) as first:
            lines = first.iter_lines()
            next(lines)
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{server.url}/v1/completions", json={**long, "prompt": "y"}, timeout=0.3)
            until(lambda: admission.in_flight == 1 and not eng.engine.scheduler.waiting, timeout=2.5)
            assert len(eng.engine.scheduler.running) == 1  # the first one goes on
        assert idle(eng)
