"""Access logs: one structured line per request, with its id, status, latency and token counts."""

from __future__ import annotations

import json
import logging

import pytest

from llmctl.runtime.server.access_log import JSONFormatter

httpx = pytest.importorskip("httpx")


def access_records(caplog) -> list[dict]:
    return [r.fields for r in caplog.records if r.name == "llmctl.access"]


def test_request_id_is_honoured_and_tokens_are_counted_without_prompt_text(server, engine, caplog):
    caplog.set_level(logging.INFO, logger="llmctl.access")
    body = {"prompt": "secret words", "max_tokens": 3, "ignore_eos": True, "stream": True}
    response = httpx.post(f"{server.url}/v1/completions", json=body, headers={"X-Request-Id": "trace-42"})
    assert response.headers["x-request-id"] == "trace-42"
    [line] = [r for r in access_records(caplog) if r["request_id"] == "trace-42"]
    assert line["status"] == 200 and line["path"] == "/v1/completions" and line["method"] == "POST"
    assert line["completion_tokens"] == 3 and line["latency_ms"] > 0
    assert line["prompt_tokens"] == len(engine.tokenizer.encode("secret words"))
    assert line["stream"] is True and "prompt" not in line
    record = next(r for r in caplog.records if getattr(r, "fields", {}).get("request_id") == "trace-42")
    formatted = json.loads(JSONFormatter().format(record))
    assert formatted["message"] == "request" and formatted["completion_tokens"] == 3
    assert "secret" not in JSONFormatter().format(record)


def test_unsafe_request_ids_are_replaced_and_errors_logged(server, caplog):
    caplog.set_level(logging.INFO, logger="llmctl.access")
    response = httpx.post(f"{server.url}/v1/completions", content=b"{",
                          headers={"X-Request-Id": "a b\tc", "Content-Type": "application/json"})
    generated = response.headers["x-request-id"]
    assert generated != "a b\tc" and len(generated) == 32
    [line] = [r for r in access_records(caplog) if r["request_id"] == generated]
    assert line["status"] == 400


def test_prompts_are_logged_only_when_asked(engine, serve, caplog):
    caplog.set_level(logging.INFO, logger="llmctl.access")
    with serve(engine, log_prompts=True) as server:
        messages = [{"role": "user", "content": "log me"}]
        httpx.post(f"{server.url}/v1/chat/completions", json={"messages": messages, "max_tokens": 1},
                   timeout=30)
    [line] = [r for r in access_records(caplog) if r["path"] == "/v1/chat/completions"]
    assert line["prompt"] == messages
