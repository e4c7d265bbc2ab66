"""vLLM's /tokenize and /detokenize: the ids the generation endpoints would use, and their errors."""

from __future__ import annotations

import pytest

httpx = pytest.importorskip("httpx")


def post(server, path: str, body) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=30)


def test_tokenize_a_prompt_and_a_chat_as_generation_would(server, engine):
    text = "def read_config(path):"
    got = post(server, "/tokenize", {"model": "tiny", "prompt": text}).json()
    assert got["tokens"] == engine.tokenizer.encode(text) and got["count"] == len(got["tokens"])
    assert got["max_model_len"] == engine.engine.config.max_model_len
    messages = [{"role": "user", "content": "hello there"}]
    chat = post(server, "/tokenize", {"messages": messages}).json()
    usage = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": messages, "max_tokens": 1},
                       timeout=30).json()["usage"]
    assert chat["count"] == usage["prompt_tokens"]
    back = post(server, "/detokenize", {"tokens": got["tokens"]}).json()
    assert back == {"prompt": engine.tokenizer.decode(got["tokens"])}


def test_tokenizer_info_and_special_tokens_serve_lm_evals_remote_tokenizer(server, engine):
    """lm-eval's tokenizer_backend=auto uses the server's tokenizer when /tokenizer_info and /tokenize answer."""
    info = httpx.get(f"{server.url}/tokenizer_info", timeout=30).json()
    assert info["eos_token"] == engine.tokenizer.eos_token and info["chat_template"] == engine.tokenizer.chat_template
    assert info["model_max_length"] == engine.engine.config.max_model_len and info["vocab_size"] == 512
    lm_utils = pytest.importorskip("lm_eval.utils")
    assert lm_utils.check_remote_tokenizer_support(server.url)
    remote = lm_utils.RemoteTokenizer(server.url)
    assert remote.encode("import json") == engine.tokenizer.encode("import json", add_special_tokens=False)
    assert remote.eos_token_id == engine.tokenizer.eos_token_id


@pytest.mark.parametrize("path,body,param,words", [
    ("/tokenize", {"prompt": "x", "messages": []}, "prompt", "not both or neither"),
    ("/tokenize", {}, "prompt", "not both or neither"),
    ("/tokenize", {"prompt": 5}, "prompt", "must be a string"),
    ("/tokenize", {"prompt": "x", "add_special_tokens": 0}, "add_special_tokens", "must be a boolean"),
    ("/tokenize", {"prompt": "x", "add_bos": True}, "add_bos", "not a field"),
    ("/detokenize", {"tokens": [1, "a"]}, "tokens", "an array of token ids"),
    ("/detokenize", {"tokens": [10**9]}, "tokens", "must be ids in [0,"),
    ("/detokenize", {}, "tokens", "is required"),
])
def test_bad_bodies_are_400_naming_the_field(server, path, body, param, words):
    response = post(server, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"]


def test_another_model_is_404(server):
    assert post(server, "/tokenize", {"model": "other", "prompt": "x"}).status_code == 404
