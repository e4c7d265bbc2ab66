"""How the server ends: engine failure (500s, /health 503, exit 1) and SIGTERM (drain, exit 0)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")


def test_engine_failure_fails_requests_in_flight_and_stops_the_server(new_engine, serve, until):
    eng = new_engine()
    step, broken = eng.engine.step, threading.Event()

    def step_until_broken():
        if broken.is_set():
            raise RuntimeError("device fell off the bus")
        time.sleep(0.01)
        return step()

    eng.engine.step = step_until_broken
    long = {"prompt": "x", "max_tokens": 100, "ignore_eos": True}
    with serve(eng) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        app, plain = server.app, {}
        with client.stream("POST", "/v1/completions", json={**long, "stream": True}) as stream:
            lines = stream.iter_lines()
            next(lines)
            waiting = threading.Thread(target=lambda: plain.update(
                r=httpx.post(f"{server.url}/v1/completions", json=long, timeout=30)))
            waiting.start()
            until(lambda: len(eng.engine.scheduler.running) == 2)
            broken.set()
            events = [line for line in lines if line]
            waiting.join(30)
        until(lambda: "code" in server.result)  # the watchdog stopped the server
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and error["code"] == "engine_dead" and events[-1] == "data: [DONE]"
    assert plain["r"].status_code == 500 and plain["r"].json()["error"]["type"] == "server_error"
    assert server.result["code"] == 1 and not eng.alive

    async def after():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as c:
            return await c.get("/health"), await c.post("/v1/completions", json={"prompt": "x"})

    health, late = asyncio.run(after())
    assert health.status_code == 503
    assert late.status_code == 500 and late.json()["error"]["code"] == "engine_dead"


def test_sigterm_finishes_in_flight_requests_then_exits_0(chat_model, port):
    """The real command in a subprocess on loopback: SIGTERM while a stream runs; the stream completes."""
    command = [sys.executable, "-c", "import typer; from llmctl.cli.serve import serve; typer.run(serve)",
               chat_model, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
               "--dtype", "float32", "--max-model-len", "512", "--shutdown-timeout", "30"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "LLMCTL_LOG_FORMAT": "json"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the server did not come up in 120 s"
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"prompt": "def f(x):", "max_tokens": 400, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            events = [line for line in lines if line]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2].removeprefix("data: "))["usage"]["completion_tokens"] == 400
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        _, stderr = proc.communicate()
    records = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    access = [r for r in records if r["logger"] == "llmctl.access" and r["path"] == "/v1/completions"]
    assert len(access) == 1 and access[0]["status"] == 200 and access[0]["completion_tokens"] == 400
    messages = [r["message"] for r in records]
    assert messages.index("Shutting down") < records.index(access[0])  # the request was in flight at SIGTERM
    assert records[-1]["message"] == "server stopped" and records[-1]["exit_code"] == 0
    # Start-up says what it is doing: where it listens, the weights, the KV cache, and when it is ready.
    listening, ready = records[messages.index("listening; loading the model")], records[messages.index("model loaded; ready")]
    assert listening["url"] == url and listening["model"] == str(chat_model) and ready["seconds"] > 0
    loading = messages[messages.index("listening; loading the model"): messages.index("model loaded; ready")]
    assert any(m.startswith("loaded the weights in") and "GiB, float32 on cpu" in m for m in loading)
    assert any(m.startswith("KV cache: ") and " tokens (" in m for m in loading)


def test_the_port_opens_while_the_model_loads(chat_model, serve, scrape, until):
    from llmctl.runtime.async_engine import AsyncEngine
    from llmctl.runtime.config import EngineConfig

    config = EngineConfig(model=chat_model, dtype="float32", max_model_len=128, max_num_seqs=4)
    go, made = threading.Event(), []

    def load():
        go.wait(30)
        made.append(AsyncEngine(config))
        return made[0]

    try:
        with serve(None, load=load, config=config) as server:
            assert httpx.get(f"{server.url}/health").json() == {"status": "loading", "reason": "the model is loading"}
            ready = httpx.get(f"{server.url}/ready")
            assert ready.status_code == 503 and ready.json()["status"] == "loading"
            late = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 1})
            assert late.status_code == 503 and late.json()["error"]["code"] == "model_loading"
            assert late.headers["retry-after"] == "1"
            assert scrape(server.url)["llmctl:server_ready"] == 0
            go.set()
            until(lambda: httpx.get(f"{server.url}/ready").status_code == 200, timeout=60)
            assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
            done = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
            assert done.status_code == 200 and scrape(server.url)["llmctl:server_ready"] == 1
    finally:
        go.set()
        for eng in made:
            eng.shutdown(timeout=5)


def test_a_model_that_fails_to_load_stops_the_server_with_its_reason(chat_model, serve, until):
    from llmctl.runtime.config import EngineConfig

    def load():
        raise ValueError("the model's weights need 99 GiB")

    config = EngineConfig(model=chat_model, dtype="float32", max_model_len=128)
    with serve(None, load=load, config=config) as server:
        until(lambda: "error" in server.result or "code" in server.result)
    assert str(server.result["error"]) == "the model's weights need 99 GiB"


def test_health_turns_503_when_the_engine_stops_making_progress(new_engine, serve, slow_steps, scrape, until):
    eng = new_engine()
    with serve(eng, stall_timeout=0.3) as server:
        assert httpx.get(f"{server.url}/health").status_code == 200
        slow_steps(eng, 1.5)  # a step that hangs, as a stuck kernel would
        body = {"prompt": "x", "max_tokens": 3, "ignore_eos": True}
        worker = threading.Thread(target=httpx.post, args=(f"{server.url}/v1/completions",),
                                  kwargs={"json": body, "timeout": 60})
        worker.start()
        until(lambda: httpx.get(f"{server.url}/health").status_code == 503, timeout=10)
        stalled = httpx.get(f"{server.url}/health").json()
        assert stalled["status"] == "stalled" and "no engine step has completed" in stalled["reason"]
        assert httpx.get(f"{server.url}/ready").status_code == 503
        assert scrape(server.url)["llmctl:engine_stall_seconds"] > 0.3
        worker.join(60)
        until(lambda: httpx.get(f"{server.url}/health").status_code == 200, timeout=10)


def test_when_the_shutdown_timeout_expires_requests_end_cleanly(new_engine, serve, slow_steps, until, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="llmctl.access")
    eng = new_engine()
    slow_steps(eng, 0.05)
    long = {"prompt": "x", "max_tokens": 120, "ignore_eos": True}  # 6 s of steps, against 0.5 s of grace
    with serve(eng, shutdown_timeout=0.5) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        plain = {}
        with client.stream("POST", "/v1/completions", json={**long, "max_tokens": 100, "stream": True}) as stream:
            lines = stream.iter_lines()
            next(lines)
            waiting = threading.Thread(target=lambda: plain.update(
                r=httpx.post(f"{server.url}/v1/completions", json=long, timeout=60)))
            waiting.start()
            until(lambda: len(eng.engine.scheduler.running) == 2)
            server.server.should_exit = True  # what SIGTERM does
            events = [line for line in lines if line]
            waiting.join(60)
        until(lambda: "code" in server.result, timeout=20)
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == "server_shutting_down" and events[-1] == "data: [DONE]"
    assert plain["r"].status_code == 503 and plain["r"].json()["error"]["code"] == "server_shutting_down"
    assert server.result["code"] == 0
    access = [r.fields for r in caplog.records if r.name == "llmctl.access" and r.fields["path"] == "/v1/completions"]
    assert sorted(a["status"] for a in access) == [200, 503]
    assert next(a for a in access if a["status"] == 200)["error_code"] == "server_shutting_down"
    assert wait_idle_blocks(eng)


def wait_idle_blocks(eng, timeout: float = 5.0) -> bool:
    core, deadline = eng.engine, time.monotonic() + timeout
    while time.monotonic() < deadline:
        if core.block_manager.num_free_blocks == core.block_manager.num_blocks:
            return True
        time.sleep(0.01)
    return False


def test_a_fault_in_one_requests_work_fails_it_alone(new_engine, serve, monkeypatch):
    eng = new_engine()
    processor = eng.engine.output_processor
    apply = processor._apply
    boom = eng.tokenizer.encode("boom")

    def faulty(seq, *args):
        if seq.prompt_token_ids == boom and seq.num_output_tokens == 2:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a tokenizer that cannot decode")
        return apply(seq, *args)

    monkeypatch.setattr(processor, "_apply", faulty)
    body = {"max_tokens": 12, "ignore_eos": True, "temperature": 0}
    with serve(eng) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        results = {}
        threads = [threading.Thread(target=lambda p=p: results.update({p: client.post(
            "/v1/completions", json={**body, "prompt": p})})) for p in ("boom", "fine", "also fine")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        with client.stream("POST", "/v1/completions", json={**body, "prompt": "boom", "stream": True}) as stream:
            events = [line for line in stream.iter_lines() if line]
        after = client.post("/v1/completions", json={**body, "prompt": "fine"})
        assert httpx.get(f"{server.url}/health").status_code == 200
    failed = results["boom"].json()["error"]
    assert results["boom"].status_code == 500 and failed["code"] == "request_failed"
    assert "UnicodeDecodeError" not in failed["message"]  # internals stay in the server log
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "request_failed"
    assert events[-1] == "data: [DONE]"
    for prompt in ("fine", "also fine"):
        assert results[prompt].status_code == 200
        assert results[prompt].json()["usage"]["completion_tokens"] == 12
    assert after.json()["choices"][0]["text"] == results["fine"].json()["choices"][0]["text"]
    assert eng.alive
