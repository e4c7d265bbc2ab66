"""Errors in OpenAI's shape with the right status: 400, 401, 404, 429; unknown fields ignored."""

from __future__ import annotations

import threading

import pytest

httpx = pytest.importorskip("httpx")
JSON = {"Content-Type": "application/json"}
openai = pytest.importorskip("openai")


def post(server, path: str, body=None, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=30, **kwargs)


def error_of(response: httpx.Response, status: int, kind: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == kind
    return error


def test_prompt_over_the_context_is_400_naming_both_numbers(server):
    body = {"model": "tiny", "prompt": list(range(100)), "max_tokens": 40}
    error = error_of(post(server, "/v1/completions", body), 400, "invalid_request_error")
    assert "maximum context length is 128 tokens" in error["message"]
    assert "the prompt has 100 tokens" in error["message"] and "max_tokens is 40" in error["message"]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="tiny", prompt=list(range(100)), max_tokens=40, stream=True)


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "x", "temperature": "hot"}, "temperature", "must be a finite number, got a string"),
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens", "must be an integer"),
    ({"prompt": "x", "stream": "yes"}, "stream", "must be a boolean"),
    ({"prompt": "x", "stop": ["a", 1]}, "stop", "a string or an array of strings"),
    ({"prompt": "x", "logprobs": True}, "logprobs", "must be an integer, got a boolean"),
    ({"prompt": [[1, 2], "x"]}, "prompt", "'prompt' must be"),
    ({"prompt": "x", "echo": 1}, "echo", "must be a boolean"),
    ({"prompt": "x", "suffix": "}"}, "suffix", "not supported"),
    ({"prompt": "x", "best_of": 200}, "best_of", "'best_of' must be in [n, 128] (n is 1), got 200"),
    ({"prompt": "x", "n": 3, "best_of": 2}, "best_of", "'best_of' must be in [n, 128] (n is 3), got 2"),
    ({"prompt": "x", "best_of": 2, "stream": True}, "best_of", "cannot be used with 'stream'"),
    ({"prompt": "x", "seed": 2**64}, "seed", "'seed' must be in"),
    ({"prompt": "x", "n": 10_000}, "n", "must be at most 128"),
    ({"prompt": "x", "min_tokens": "3"}, "min_tokens", "must be an integer"),
    ({"prompt": "x", "top_p": 0}, None, "top_p must be in (0, 1]"),
    ({"prompt": "x", "logit_bias": [1]}, "logit_bias", "must be an object mapping token ids"),
    ({"prompt": "x", "logit_bias": {"-3": 1}}, "logit_bias", "keys must be token ids, got '-3'"),
    ({"prompt": "x", "logit_bias": {"٣": 1}}, "logit_bias", "keys must be token ids"),
    ({"prompt": "x", "logit_bias": {"3": 101}}, "logit_bias", "values must be numbers in [-100, 100], got 101"),
    ({"prompt": "x", "logit_bias": {"3": "up"}}, "logit_bias", "values must be numbers in [-100, 100]"),
    ({"prompt": "x", "logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias", "at most 1024"),
    ({"prompt": "x", "logit_bias": {"999999": 5}}, None, "below the vocabulary size"),
])
def test_bad_fields_are_400(server, body, param, words):
    error = error_of(post(server, "/v1/completions", body), 400, "invalid_request_error")
    assert error["param"] == param and words in error["message"]


def test_min_tokens_over_max_tokens_is_400(server):
    body = {"prompt": "x", "max_tokens": 4, "min_tokens": 9}
    error = error_of(post(server, "/v1/completions", body), 400, "invalid_request_error")
    assert "min_tokens (9) must not exceed max_tokens (4)" in error["message"]


def test_chat_field_errors(server):
    msg = [{"role": "user", "content": "hi"}]
    cases = [
        ({"messages": msg, "logprobs": 3}, "must be a boolean"),
        ({"messages": msg, "top_logprobs": 2}, "needs 'logprobs': true"),
        ({"messages": []}, "non-empty array"),
        ({"messages": [{"content": "no role"}]}, "string 'role'"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "only text parts"),
        ({"messages": msg, "tools": [{"type": "function"}]}, "tools[0] must be"),
        ({"messages": msg, "logit_bias": {"x": 1}}, "keys must be token ids"),
    ]
    for body, words in cases:
        error = error_of(post(server, "/v1/chat/completions", body), 400, "invalid_request_error")
        assert words in error["message"]


def test_malformed_json_and_non_objects_are_400(server):
    for raw in (b"{", b"\xff\xfe", b"[" * 100_000, b"[1, 2]"):
        response = httpx.post(f"{server.url}/v1/completions", content=raw, timeout=30, headers=JSON)
        error_of(response, 400, "invalid_request_error")


def test_unknown_fields_are_refused_by_name(server):
    # A field the server does not support is never silently dropped (OpenAI refuses them too).
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2, "frobnicate": {"a": 1}, "user": "u-1"}
    error = error_of(post(server, "/v1/completions", body), 400, "invalid_request_error")
    assert error["param"] == "frobnicate" and "frobnicate" in error["message"]


def test_unknown_model_is_404_and_unknown_route_is_openai_shaped(server):
    response = post(server, "/v1/completions", {"model": "gpt-4", "prompt": "x"})
    error = error_of(response, 404, "not_found_error")
    assert error["param"] == "model" and error["code"] == "model_not_found" and "gpt-4" in error["message"]
    error_of(post(server, "/v1/embeddings", {}), 404, "not_found_error")
    error_of(httpx.get(f"{server.url}/v1/completions"), 405, "invalid_request_error")


def test_api_key(engine, serve):
    with serve(engine, api_keys=("s3cret",)) as server:
        body = {"prompt": "x", "max_tokens": 1}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Basic s3cret"}):
            response = post(server, "/v1/completions", body, headers=headers)
            assert error_of(response, 401, "authentication_error")["code"] == "invalid_api_key"
            assert response.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{server.url}/v1/models").status_code == 401
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert httpx.get(f"{server.url}/metrics").status_code == 200
        import llmctl  # /version, as vLLM's, is open: benchmark reports record it

        assert httpx.get(f"{server.url}/version").json() == {"version": llmctl.__version__, "server": "llmctl"}
        good = openai.OpenAI(base_url=f"{server.url}/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="tiny", prompt="x", max_tokens=1).usage.completion_tokens == 1
        bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="s3cre", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_full_queue_is_429_with_retry_after(new_engine, serve, idle, slow_steps, until):
    """One sequence runs, one waits; a third is refused until the first two are done."""
    eng = new_engine(max_num_seqs=1)
    slow_steps(eng, 0.02)
    with serve(eng, max_queue_len=1, retry_after=3) as server:
        long = {"prompt": "x", "max_tokens": 100, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=server.url, timeout=30) as c1, \
                httpx.Client(base_url=server.url, timeout=30) as c2:
            with c1.stream("POST", "/v1/completions", json=long) as first:
                lines = first.iter_lines()  # kept: a dropped iterator closes the connection
                next(lines)  # running
                results = {}
                waiting = threading.Thread(target=lambda: results.update(r=c2.post("/v1/completions", json={
                    "prompt": "y", "max_tokens": 2})))
                waiting.start()
                until(lambda: server.app.state.server.admission.in_flight == 2)
                refused = post(server, "/v1/completions", {"prompt": "z", "max_tokens": 2})
                assert error_of(refused, 429, "rate_limit_error") and refused.headers["retry-after"] == "3"
                never_fits = post(server, "/v1/completions", {"prompt": "z", "n": 3})
                assert never_fits.status_code == 400
            waiting.join(30)  # leaving the stream above aborted the first request, so the second one ran
        assert results["r"].status_code == 200
        assert idle(eng)
        assert post(server, "/v1/completions", {"prompt": "z", "max_tokens": 2}).status_code == 200


def test_models_without_tokenizer_or_template(tiny_models, new_engine, serve):
    """A tokenizer-less model serves token-id prompts only; chat needs a chat template."""
    with serve(new_engine(tiny_models["llama"])) as server:
        chat = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        error = error_of(chat, 400, "invalid_request_error")
        assert "no chat template" in error["message"]
        assert "no tokenizer" in error_of(post(server, "/v1/completions", {"prompt": "hi"}), 400,
                                          "invalid_request_error")["message"]
        out = post(server, "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 3, "logprobs": 1}).json()
        assert out["choices"][0]["text"] == "" and out["usage"]["completion_tokens"] == 3
        assert all(t.startswith("token_id:") for t in out["choices"][0]["logprobs"]["tokens"])


def test_body_over_the_limit_is_413_declared_or_streamed(engine, serve):
    with serve(engine, max_body_bytes=2048) as server:
        body = {"model": "tiny", "prompt": "x" * 4096, "max_tokens": 1}
        error = error_of(post(server, "/v1/completions", body), 413, "invalid_request_error")
        assert "limit of 2048 bytes" in error["message"] and error["code"] == "request_too_large"

        def chunks():  # no Content-Length: the limit must hold while the body streams in
            yield b'{"prompt": "'
            for _ in range(8):
                yield b"x" * 512
            yield b'", "max_tokens": 1}'

        streamed = httpx.post(f"{server.url}/v1/completions", content=chunks(), timeout=30, headers=JSON)
        error_of(streamed, 413, "invalid_request_error")
        assert post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1}).status_code == 200
