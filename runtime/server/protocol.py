"""Request bodies of /v1/completions and /v1/chat/completions → one `GenerationRequest`, or a 400.

Fields are read one by one with their JSON type checked, because a value of the wrong type must be
a 400 here and never reach the engine thread, where a failure would stop the loop for everybody.
Unknown fields are ignored, as OpenAI does; known ones that we cannot honour are refused, not dropped.
`null` means "the default" for every field, as in OpenAI's API.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmctl.runtime.sampling_params import SamplingParams
from llmctl.runtime.server.errors import APIError

SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed takes


@dataclass
class GenerationRequest:
    chat: bool
    prompts: list[str | list[int]]  # completions: one per batch entry; chat: one rendered conversation
    params: SamplingParams
    model: str | None
    stream: bool
    include_usage: bool  # streaming: end with a usage chunk
    user: str | None
    raw_prompt: Any  # prompt or messages as sent, for the access log when prompts are logged


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    # JSON allows integers too big for a float, and Python's json module reads NaN and Infinity.
    return (_is_int(v) or isinstance(v, float)) and abs(v) <= sys.float_info.max


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


def _describe(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(v), "null")


class Body:
    """A JSON object whose fields are read with a type check each."""

    def __init__(self, data: Any) -> None:
        if not isinstance(data, dict):
            raise APIError(400, f"the request body must be a JSON object, got {_describe(data)}")
        self.data = data

    def get(self, name: str, check: Callable[[Any], bool], expected: str, default: Any = None) -> Any:
        value = self.data.get(name)
        if value is None:
            return default
        if not check(value):
            raise APIError(400, f"'{name}' must be {expected}, got {_describe(value)}", param=name)
        return value

    def integer(self, name: str, default: int | None = None) -> int | None:
        return self.get(name, _is_int, "an integer", default)

    def number(self, name: str, default: float | None = None) -> float | None:
        value = self.get(name, _is_number, "a finite number", default)
        return None if value is None else float(value)

    def boolean(self, name: str, default: bool = False) -> bool:
        return self.get(name, lambda v: isinstance(v, bool), "a boolean", default)

    def string(self, name: str) -> str | None:
        return self.get(name, lambda v: isinstance(v, str), "a string")

    def refuse(self, name: str, allowed: tuple, why: str = "is not supported by this server") -> None:
        value = self.data.get(name)
        if value is not None and not any(type(value) is type(a) and value == a for a in allowed):
            raise APIError(400, f"'{name}' {why}", param=name, code="unsupported_parameter")


def parse_completion(data: Any) -> GenerationRequest:
    body = Body(data)
    body.refuse("echo", (False,))
    body.refuse("suffix", ("",))
    body.refuse("best_of", (1,), "is not supported by this server (only best_of=1)")
    body.refuse("logit_bias", ({},))
    raw = data.get("prompt")
    prompts = _prompts(raw)
    params = _sampling_params(body, body.integer("max_tokens", body.integer("max_completion_tokens", 16)),
                              body.integer("logprobs"))
    return _request(body, False, prompts, params, raw)


def parse_chat(data: Any, render: Callable[[list[dict]], list[int]]) -> GenerationRequest:
    """`render` turns validated messages into prompt token ids with the model's chat template."""
    body = Body(data)
    body.refuse("logit_bias", ({},))
    body.refuse("tools", ([],), "(tool calling) is not supported by this server")
    body.refuse("response_format", ({"type": "text"},), "is not supported by this server (only text)")
    raw = data.get("messages")
    messages = _messages(raw)
    top = body.integer("top_logprobs")
    if top is not None and not body.boolean("logprobs"):
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    logprobs = (top or 0) if body.boolean("logprobs") else None
    max_tokens = body.integer("max_completion_tokens", body.integer("max_tokens"))  # OpenAI's newer name wins
    params = _sampling_params(body, max_tokens, logprobs)
    return _request(body, True, [render(messages)], params, raw)


def _request(body: Body, chat: bool, prompts: list, params: SamplingParams, raw: Any) -> GenerationRequest:
    stream = body.boolean("stream")
    options = Body(body.get("stream_options", lambda v: isinstance(v, dict), "an object", {}))
    return GenerationRequest(chat=chat, prompts=prompts, params=params, model=body.string("model"),
                             stream=stream, include_usage=stream and options.boolean("include_usage"),
                             user=body.string("user"), raw_prompt=raw)


def _sampling_params(body: Body, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    n = body.integer("n", 1)
    seed = body.integer("seed")
    if seed is not None and not (SEED_RANGE[0] <= seed and seed + n <= SEED_RANGE[1]):
        raise APIError(400, f"'seed' must be in [-2**63, 2**64 - n), got {seed}", param="seed")
    top_k = body.integer("top_k")
    stop = body.get("stop", lambda v: isinstance(v, str) or _is_str_list(v),
                    "a string or an array of strings", [])
    try:
        return SamplingParams(
            n=n, max_tokens=max_tokens, seed=seed, logprobs=logprobs, stop=stop,
            temperature=body.number("temperature", 1.0), top_p=body.number("top_p", 1.0),
            top_k=None if top_k in (None, 0, -1) else top_k,  # 0 and -1 switch it off, as in vLLM
            min_p=body.number("min_p", 0.0),
            presence_penalty=body.number("presence_penalty", 0.0),
            frequency_penalty=body.number("frequency_penalty", 0.0),
            repetition_penalty=body.number("repetition_penalty", 1.0),
            ignore_eos=body.boolean("ignore_eos"))
    except ValueError as exc:
        raise APIError(400, str(exc)) from exc


def _prompts(raw: Any) -> list[str | list[int]]:
    """OpenAI's four prompt forms: a string, strings (a batch), token ids, lists of token ids (a batch)."""
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list) and raw:
        if all(isinstance(p, str) for p in raw):
            return list(raw)
        if all(_is_int(t) for t in raw):
            return [list(raw)]
        if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in raw):
            return [list(p) for p in raw]
    raise APIError(400, "'prompt' must be a string, an array of strings, an array of token ids or an array "
                        "of non-empty arrays of token ids", param="prompt")


def _messages(raw: Any) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "'messages' must be a non-empty array of messages", param="messages")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a string 'role'", param="messages")
        message = {"role": m["role"], "content": _content(m.get("content"), i)}
        if isinstance(m.get("name"), str):
            message["name"] = m["name"]
        messages.append(message)
    return messages


def _content(content: Any, i: int) -> str:
    """Text content as one string: chat templates expect strings, and we take no images or audio."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(400, f"messages[{i}].content must be a string or an array of text parts", param="messages")
