"""Request bodies of /v1/completions and /v1/chat/completions → one `GenerationRequest`, or a 400.

Fields are read one by one with their JSON type checked, because a value of the wrong type must be
a 400 here and never reach the engine thread, where a failure would stop the loop for everybody.
A field this server does not know, or knows and cannot honour, is a 400 that names it, never dropped
(OpenAI refuses unknown fields too). `null` means "the default" for every field, as in OpenAI's API.
What one request may ask for is bounded (`Limits`: stop strings, n, logprobs, prompts), so that no
single request can slow every other one down.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmctl.runtime.sampling_params import SamplingParams
from llmctl.runtime.server.access_log import clip
from llmctl.runtime.server.constraints import STRUCTURED_FIELDS, TOOL_FIELDS, Tools, structured_output, tools
from llmctl.runtime.server.errors import APIError
from llmctl.runtime.server.tool_calls import arguments_as_objects

SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed takes
MAX_LOGIT_BIAS = 1024  # entries of one request's logit_bias: each costs a scatter every step
SAMPLING_FIELDS = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "n",
                   "stop", "stop_token_ids", "seed", "presence_penalty", "frequency_penalty", "repetition_penalty",
                   "ignore_eos", "user", "stream", "stream_options", "logit_bias", "logprobs", "cache_salt",
                   "priority", "skip_special_tokens", "min_tokens"}
COMPLETION_FIELDS = SAMPLING_FIELDS | STRUCTURED_FIELDS | {"prompt", "echo", "suffix", "best_of"}
CHAT_FIELDS = SAMPLING_FIELDS | STRUCTURED_FIELDS | TOOL_FIELDS | {"messages", "top_logprobs", "response_format"}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; more is a 400 that names the limit (ServerSettings has the defaults)."""

    max_prompts: int = 64
    max_n: int = 128
    max_stop: int = 16
    max_stop_chars: int = 256
    max_logprobs: int = 20


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
    cache_salt: str | None = None  # requests share cached prefixes only with requests of the same salt
    echo: bool = False  # completions: the prompt (and its logprobs) before each choice's text
    priority: int = 0  # under --scheduling-policy priority: lower is served first
    tools: Tools | None = None  # chat: the tools offered, and tool_choice
    best_of: int = 1  # sequences generated per prompt (completions may ask for more than n: the n most likely return)
    score_only: bool = False  # completions, max_tokens 0 with echo: the prompt (and its logprobs), no output


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    # JSON allows integers too big for a float, and Python's json module reads NaN and Infinity.
    return (_is_int(v) or isinstance(v, float)) and abs(v) <= sys.float_info.max


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


def _clip(text: str, limit: int = 64) -> str:
    """A client's string, short enough to quote back in an error."""
    return clip(text, limit)


def check_text(value: Any) -> None:
    """Every string in a parsed JSON value must be Unicode that UTF-8 can carry: JSON's escapes let a client
    send a lone surrogate (`"\\ud800"`), which no tokenizer, log line or response could encode."""
    stack: list[tuple[Any, str]] = [(value, "")]  # (item, its path)
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            _check_string(item, f"'{_clip(path)}'" if path else "the body")
        elif isinstance(item, dict):
            for key, child in item.items():
                _check_string(key, "a field name", path)  # before it becomes part of a path
                stack.append((child, f"{path}.{key}" if path else key))
        elif isinstance(item, list):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(item))


def _check_string(text: str, what: str, path: str = "") -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        where = path or (what.strip("'") if what.startswith("'") else "")
        raise APIError(400, f"{what} is not valid Unicode text: it holds a lone surrogate "
                            f"(\\u{ord(text[exc.start]):04x}) at character {exc.start}",
                       param=where.split(".")[0].split("[")[0] or None) from None


def _describe(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(v), "null")


class Body:
    """A JSON object whose fields are read with a type check each; fields outside `known` are refused."""

    def __init__(self, data: Any, known: set[str] | None = None) -> None:
        if not isinstance(data, dict):
            raise APIError(400, f"the request body must be a JSON object, got {_describe(data)}")
        unknown = sorted(set(data) - known) if known is not None else []
        if unknown:
            raise APIError(400, f"'{_clip(unknown[0])}' is not a field this server supports"
                                + (f" (nor {len(unknown) - 1} more)" if len(unknown) > 1 else ""),
                           param=_clip(unknown[0]), code="unsupported_parameter")
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


def parse_completion(data: Any, limits: Limits) -> GenerationRequest:
    body = Body(data, COMPLETION_FIELDS)
    body.refuse("suffix", ("",), "(insertion) is not supported by this server")
    raw = data.get("prompt")
    prompts = _prompts(raw)
    if len(prompts) > limits.max_prompts:
        raise APIError(400, f"'prompt' holds {len(prompts)} prompts; this server takes at most "
                            f"{limits.max_prompts} in one request (LLMCTL_MAX_PROMPTS)", param="prompt")
    logprobs = body.integer("logprobs")
    _check_logprobs("logprobs", logprobs, limits)
    max_tokens = body.integer("max_tokens", body.integer("max_completion_tokens", 16))
    # max_tokens 0 with echo scores the prompt alone (OpenAI's legacy completions): the engine makes one token,
    # which the response leaves out.
    score_only = max_tokens == 0 and body.boolean("echo")
    params = _sampling_params(body, 1 if score_only else max_tokens, logprobs, limits)
    params.structured = structured_output(body, chat=False)
    request = _request(body, False, prompts, params, raw)
    request.echo, request.score_only = body.boolean("echo"), score_only
    if request.echo and logprobs is not None:
        params.prompt_logprobs = logprobs
    request.best_of = body.integer("best_of", params.n)
    if not params.n <= request.best_of <= limits.max_n:
        raise APIError(400, f"'best_of' must be in [n, {limits.max_n}] (n is {params.n}), got {request.best_of}",
                       param="best_of")
    if request.best_of > params.n and request.stream:
        raise APIError(400, "'best_of' cannot be used with 'stream': the best choices are known only at the end",
                       param="best_of")
    return request


def parse_chat(data: Any, limits: Limits) -> tuple[GenerationRequest, list[dict]]:
    """The request, and its validated messages: rendering them into a prompt is the caller's (it is the
    expensive part, done off the event loop)."""
    body = Body(data, CHAT_FIELDS)
    raw = data.get("messages")
    messages = _messages(raw)
    top = body.integer("top_logprobs")
    if top is not None and not body.boolean("logprobs"):
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    _check_logprobs("top_logprobs", top, limits)
    logprobs = (top or 0) if body.boolean("logprobs") else None
    max_tokens = body.integer("max_completion_tokens", body.integer("max_tokens"))  # OpenAI's newer name wins
    params = _sampling_params(body, max_tokens, logprobs, limits)
    params.structured = structured_output(body, chat=True)
    request = _request(body, True, [], params, raw)
    request.tools = tools(body)
    forced = request.tools.constraint() if request.tools is not None else None
    if forced is not None:
        if params.structured is not None:
            raise APIError(400, f"tool_choice {request.tools.choice!r} constrains the output already: drop "
                                "'response_format' or the structured-output field", param="tool_choice")
        params.structured = forced
    return request, messages


def parse_tokenize(data: Any) -> tuple[str | list[dict], bool]:
    """POST /tokenize (vLLM's): a `prompt` string, or chat `messages` rendered as /v1/chat/completions does;
    and, for a prompt, `add_special_tokens` (default true: as /v1/completions encodes it)."""
    body = Body(data, {"model", "prompt", "messages", "add_special_tokens"})
    add_special = body.boolean("add_special_tokens", True)
    if ("prompt" in data) == ("messages" in data):
        raise APIError(400, "send either 'prompt' (text) or 'messages' (a chat), not both or neither",
                       param="prompt")
    if "messages" in data:
        return _messages(data["messages"]), add_special
    prompt = body.string("prompt")
    if prompt is None:
        raise APIError(400, "'prompt' must be a string", param="prompt")
    return prompt, add_special


def parse_detokenize(data: Any, vocab_size: int) -> list[int]:
    """POST /detokenize (vLLM's): `tokens`, ids in the vocabulary."""
    body = Body(data, {"model", "tokens"})
    tokens = body.get("tokens", lambda v: isinstance(v, list) and all(_is_int(t) for t in v), "an array of token ids")
    if tokens is None:
        raise APIError(400, "'tokens' is required", param="tokens")
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise APIError(400, f"'tokens' must be ids in [0, {vocab_size}), got {bad[:3]}", param="tokens")
    return tokens


def _check_logprobs(name: str, value: int | None, limits: Limits) -> None:
    if value is not None and not 0 <= value <= limits.max_logprobs:
        raise APIError(400, f"'{name}' must be in [0, {limits.max_logprobs}], got {value}", param=name)


def _request(body: Body, chat: bool, prompts: list, params: SamplingParams, raw: Any) -> GenerationRequest:
    stream = body.boolean("stream")
    options = Body(body.get("stream_options", lambda v: isinstance(v, dict), "an object", {}))
    return GenerationRequest(chat=chat, prompts=prompts, params=params, model=body.string("model"),
                             stream=stream, include_usage=stream and options.boolean("include_usage"),
                             user=body.string("user"), raw_prompt=raw, cache_salt=body.string("cache_salt"),
                             best_of=params.n, priority=_priority(body))


def _priority(body: Body) -> int:
    priority = body.integer("priority", 0)
    if not -(2**31) <= priority < 2**31:
        raise APIError(400, f"'priority' must be a 32-bit integer, got {priority}", param="priority")
    return priority


def _sampling_params(body: Body, max_tokens: int | None, logprobs: int | None, limits: Limits) -> SamplingParams:
    n = body.integer("n", 1)
    if n > limits.max_n:
        raise APIError(400, f"'n' must be at most {limits.max_n} on this server, got {n}", param="n")
    seed = body.integer("seed")
    if seed is not None and not (SEED_RANGE[0] <= seed and seed + n <= SEED_RANGE[1]):
        raise APIError(400, f"'seed' must be in [-2**63, 2**64 - n), got {seed}", param="seed")
    top_k = body.integer("top_k")
    stop = body.get("stop", lambda v: isinstance(v, str) or _is_str_list(v),
                    "a string or an array of strings", [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > limits.max_stop:
        raise APIError(400, f"'stop' holds {len(stop)} strings; this server takes at most {limits.max_stop}",
                       param="stop")
    if any(len(s) > limits.max_stop_chars for s in stop):
        raise APIError(400, f"a stop string is longer than this server's limit of {limits.max_stop_chars} "
                            "characters", param="stop")
    stop_token_ids = body.get("stop_token_ids", lambda v: isinstance(v, list) and all(_is_int(t) for t in v),
                              "an array of token ids", [])
    if len(stop_token_ids) > limits.max_stop:
        raise APIError(400, f"'stop_token_ids' holds {len(stop_token_ids)} ids; this server takes at most "
                            f"{limits.max_stop}", param="stop_token_ids")
    try:
        return SamplingParams(
            n=n, max_tokens=max_tokens, seed=seed, logprobs=logprobs, stop=stop, stop_token_ids=stop_token_ids,
            temperature=body.number("temperature", 1.0), top_p=body.number("top_p", 1.0),
            top_k=None if top_k in (None, 0, -1) else top_k,  # 0 and -1 switch it off, as in vLLM
            min_p=body.number("min_p", 0.0),
            presence_penalty=body.number("presence_penalty", 0.0),
            frequency_penalty=body.number("frequency_penalty", 0.0),
            repetition_penalty=body.number("repetition_penalty", 1.0),
            ignore_eos=body.boolean("ignore_eos"), min_tokens=body.integer("min_tokens", 0),
            logit_bias=_logit_bias(body),
            skip_special_tokens=body.boolean("skip_special_tokens", True))
    except ValueError as exc:
        raise APIError(400, str(exc)) from exc


def _logit_bias(body: Body) -> dict[int, float]:
    """OpenAI's map of token ids (as JSON object keys: strings of digits) to biases in [-100, 100]."""
    raw = body.get("logit_bias", lambda v: isinstance(v, dict), "an object mapping token ids to biases", {})
    if len(raw) > MAX_LOGIT_BIAS:
        raise APIError(400, f"'logit_bias' holds {len(raw)} entries; this server takes at most {MAX_LOGIT_BIAS}",
                       param="logit_bias")
    bias = {}
    for key, value in raw.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 10):
            raise APIError(400, f"'logit_bias' keys must be token ids, got {_clip(key)!r}", param="logit_bias")
        if not _is_number(value) or not -100 <= value <= 100:
            raise APIError(400, f"'logit_bias' values must be numbers in [-100, 100], got {_clip(str(value))} for "
                                f"token {key}", param="logit_bias")
        bias[int(key)] = float(value)
    return bias


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
        for key in ("name", "tool_call_id"):
            if isinstance(m.get(key), str):
                message[key] = m[key]
        if m.get("tool_calls") is not None:
            message["tool_calls"] = _tool_calls(m["tool_calls"], i)
        messages.append(message)
    return messages


def _tool_calls(calls: Any, i: int) -> list[dict]:
    """An assistant message's tool calls, as the chat template renders them: arguments as objects."""
    ok = isinstance(calls, list) and all(
        isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str)
        and isinstance(c["function"].get("arguments", "{}"), (str, dict)) for c in calls)
    if not ok:
        raise APIError(400, f"messages[{i}].tool_calls must be an array of {{\"id\", \"type\": \"function\", "
                            "\"function\": {\"name\", \"arguments\"}}}", param="messages")
    return arguments_as_objects([{"tool_calls": calls}])[0]["tool_calls"]


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
