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
