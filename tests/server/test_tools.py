"""Tool calling through the openai SDK on a tiny model whose template renders tools (Qwen2.5's hermes format):
forced calls (named, required) are valid by construction; "auto" parses whatever the model writes, shown
here by forcing the model's text with a regex; tool results go back in; and the 400s."""

from __future__ import annotations

import json

import httpx
import pytest

openai = pytest.importorskip("openai")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Oslo", "Lima"]}, "days": {"type": "integer",
                   "minimum": 1, "maximum": 7}}, "required": ["city", "days"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Oslo this week?"}]


@pytest.fixture(scope="module")
def tools_server(hermes_model, engine_factory, serve):
    engine = engine_factory(hermes_model, max_model_len=2048)
    with serve(engine) as running:
        yield running
    engine.shutdown(timeout=5)


@pytest.fixture(scope="module")
def client(tools_server):
    return openai.OpenAI(base_url=f"{tools_server.url}/v1", api_key="x", max_retries=0)


def check_weather(arguments: str) -> None:
    args = json.loads(arguments)
    assert set(args) == {"city", "days"} and args["city"] in ("Oslo", "Lima") and 1 <= args["days"] <= 7


def test_named_tool_choice_gives_its_arguments_whole_and_streamed(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    out = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, TIME], tool_choice=named,
                                         max_tokens=100, temperature=0.0)
    message = out.choices[0].message
    assert message.content is None and out.choices[0].finish_reason == "stop"
    [call] = message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    check_weather(call.function.arguments)
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, TIME],
                                                 tool_choice=named, max_tokens=100, temperature=0.0, stream=True))
    pieces = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert pieces[0].id and pieces[0].function.name == "get_weather"
    assert "".join(p.function.arguments or "" for p in pieces) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_required_gives_calls_to_offered_tools(client):
    """One call at most without parallel calls; with them, a random model may add calls until max_tokens, so
    some of a few seeded samples must end, each with valid calls."""
    for parallel, seeds in ((False, [3]), (True, range(6))):
        ended = []
        for seed in seeds:
            out = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, TIME],
                                                 tool_choice="required", parallel_tool_calls=parallel,
                                                 max_tokens=300, temperature=1.0, seed=seed)
            choice = out.choices[0]
            if choice.finish_reason == "length":  # cut short: the calls begun, the last one's arguments unfinished
                assert choice.message.content is None and choice.message.tool_calls
                assert all(c.function.name in ("get_weather", "get_time") for c in choice.message.tool_calls)
                continue
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            ended.append(choice.message.tool_calls)
        assert ended and all(parallel or len(calls) == 1 for calls in ended)
        for call in (c for calls in ended for c in calls):
            if call.function.name == "get_weather":
                check_weather(call.function.arguments)
            else:
                assert call.function.name == "get_time" and json.loads(call.function.arguments)["zone"] in ("UTC", "CET")


def test_required_calls_stream_as_they_come_and_match_the_whole_answer(client):
    """Each call's id and name as soon as its name is complete, then its arguments in pieces; the pieces add
    up to the calls the same request returns whole."""
    args = dict(model="tiny", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                parallel_tool_calls=False, max_tokens=300, temperature=1.0, seed=3)
    whole = client.chat.completions.create(**args).choices[0]
    chunks = list(client.chat.completions.create(**args, stream=True))
    pieces = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert pieces[0].id.startswith("call_") and pieces[0].function.name == whole.message.tool_calls[0].function.name
    assert len(pieces) > 2  # the arguments came in several chunks, not at the end in one
    assert "".join(p.function.arguments or "" for p in pieces) == whole.message.tool_calls[0].function.arguments
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)


def test_auto_parses_the_models_own_tool_call_format(client):
    """The model's text is forced (a regex) to what a hermes model writes; the server must parse it, whole and
    streamed, into the same call."""
    said = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima", "days": 2}}\n</tool_call>'
    force = {"structured_outputs": {"regex": said.replace("{", "\\{").replace("}", "\\}").replace(".", "\\.")}}
    args = dict(model="tiny", messages=ASK, tools=[WEATHER, TIME], max_tokens=120, temperature=0.0, extra_body=force)
    out = client.chat.completions.create(**args)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me look."
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Lima", "days": 2}
    chunks = list(client.chat.completions.create(**args, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    pieces = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert content == "Let me look." and pieces[0].function.name == "get_weather"
    assert "".join(p.function.arguments or "" for p in pieces) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_results_go_back_to_the_model(client):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo", "days": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"forecast": "rain"}'},
    ]
    out = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], max_tokens=4,
                                         temperature=0.0)
    assert out.choices[0].message.role == "assistant"
    tokens = httpx.post(f"{client.base_url}".replace("/v1/", "/tokenize"),
                        json={"messages": history}).json()
    assert tokens["count"] == out.usage.prompt_tokens - 0 or tokens["count"] > 0


@pytest.mark.parametrize("body, param, words", [
    ({"tools": [{"type": "function"}]}, "tools", "tools[0] must be"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "two tools are named 'get_weather'"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "'nope', which is not among 'tools'"),
    ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "must be \"none\""),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "constrains the output already"),
    ({"response_format": {"type": "xml"}}, "response_format", "'response_format' must be"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": True,
                                                                  "schema": {"type": "array", "uniqueItems": True}}}},
     "response_format", "Unimplemented keys: [\"uniqueItems\"]"),
    ({"structured_outputs": {"regex": "(?=a)"}}, "structured_outputs", "look-around"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs", "non-empty array"),
    ({"structured_outputs": {"jsonish": {}}}, "structured_outputs", "'structured_outputs.jsonish' is not supported"),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice", "one structured output, not several"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {}}]}]}, "messages", "tool_calls must be"),
])
def test_bad_tools_and_formats_are_400s_that_name_them(tools_server, body, param, words):
    r = httpx.post(f"{tools_server.url}/v1/chat/completions", json={"model": "tiny", "messages": ASK, **body})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == param and words in error["message"], error


def test_auto_needs_a_tool_call_format(server):
    """The plain ChatML model's template names no tool-call format: auto is refused, the others still work."""
    body = {"model": "tiny", "messages": ASK, "tools": [WEATHER], "max_tokens": 60, "temperature": 0.0}
    error = httpx.post(f"{server.url}/v1/chat/completions", json=body).json()["error"]
    assert error["param"] == "tool_choice" and "--tool-call-parser" in error["message"]
    named = httpx.post(f"{server.url}/v1/chat/completions", json={
        **body, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}).json()
    check_weather(named["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])


def test_mistral_auto_keeps_control_tokens_for_its_parser(engine, serve):
    """Mistral's [TOOL_CALLS] is a control token, which decoding normally drops: with its parser and tool_choice
    auto, the server keeps control tokens in the text (shown with the ChatML model's <|im_start|>, forced), and
    a plain request still drops them."""
    start = engine.tokenizer.convert_tokens_to_ids("<|im_start|>")
    body = {"model": "tiny", "messages": ASK, "max_tokens": 3, "temperature": 0.0, "logit_bias": {str(start): 100}}
    with serve(engine, tool_call_parser="mistral") as running:
        url = f"{running.url}/v1/chat/completions"
        kept = httpx.post(url, json={**body, "tools": [WEATHER]}).json()["choices"][0]["message"]["content"]
        dropped = httpx.post(url, json=body).json()["choices"][0]["message"]["content"]
        shown = httpx.post(url, json={**body, "skip_special_tokens": False}).json()["choices"][0]["message"]
    assert kept == "<|im_start|>" * 3 and dropped == "" and shown["content"] == kept


@pytest.mark.parametrize("text, calls", [
    ('[{"name": "get_weather", "parameters": {"city": "Oslo", "days": 3}}]',
     [("get_weather", '{"city": "Oslo", "days": 3}')]),
    ('[ {"name":"a","parameters":{"x": "}{\\"]", "y": [1, {"z": 2}]}} , {"name": "b", "parameters": 5 }]',
     [("a", '{"x": "}{\\"]", "y": [1, {"z": 2}]}'), ("b", "5 ")]),
    ('[{"name": "c", "parameters": "str}"}]', [("c", '"str}"')]),
    ('[{"name": "d", "parameters": {"q": "cut sho', [("d", '{"q": "cut sho')]),
])
def test_required_output_splits_into_calls_however_the_text_is_cut(text, calls):
    """Brackets and quotes inside strings, escapes, scalar parameters, spaces where the grammar allows them,
    a cut-short end: fed in random pieces, the calls and the streamed arguments are those of the whole text."""
    import random

    from llmctl.runtime.server.tool_output import _CallStream

    rng = random.Random(0)
    for _ in range(30):
        stream, pieces, i = _CallStream(), [], 0
        while i < len(text):
            step = rng.randint(1, 7)
            pieces += stream.feed(text[i:i + step])
            i += step
        assert [(c["name"], c["arguments"]) for c in stream.calls] == calls
        streamed: dict[int, str] = {}
        for piece in pieces:
            for call in piece["tool_calls"]:
                streamed[call["index"]] = streamed.get(call["index"], "") + call["function"]["arguments"]
        assert [streamed[i] for i in range(len(calls))] == [arguments for _, arguments in calls]
