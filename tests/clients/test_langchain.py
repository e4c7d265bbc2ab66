"""LangChain's ChatOpenAI against the server: invoke and stream, tools, structured output. LangChain sends
`max_completion_tokens`, `stream_options` only when asked for usage, and for tools and structured output the
shapes the recorder shows (asserted below where a test depends on them)."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel, Field

langchain_openai = pytest.importorskip("langchain_openai")
openai = pytest.importorskip("openai")

PROMPT = "Which function turns a Python object into a JSON string?"


class GetWeather(BaseModel):
    """Get the weather in a city."""

    # An enum keeps a random model's arguments short: a free string could run to max_tokens unclosed.
    city: Literal["Paris", "Oslo", "Lima"] = Field(description="the city")


class Forecast(BaseModel):
    """A weather forecast."""

    city: Literal["Paris", "Oslo", "Lima"]
    rain: bool


@pytest.fixture
def chat(server, recorder):
    """chat(**options): a greedy ChatOpenAI on the test server, its requests recorded."""
    def make(**options):
        return langchain_openai.ChatOpenAI(base_url=f"{server.url}/v1", api_key="unused", model=server.model,
                                           temperature=0, max_retries=0, http_client=recorder.client(),
                                           **{"max_tokens": 8, **options})

    return make


def direct_answer(server, max_tokens: int = 8):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    return client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=max_tokens, temperature=0)


def test_invoke_is_the_servers_greedy_answer(chat, server, recorder):
    message = chat().invoke(PROMPT)
    direct = direct_answer(server)
    assert message.content == direct.choices[0].message.content
    assert message.response_metadata["finish_reason"] == direct.choices[0].finish_reason
    assert message.usage_metadata["input_tokens"] == direct.usage.prompt_tokens
    assert message.usage_metadata["output_tokens"] == direct.usage.completion_tokens
    assert recorder.bodies[0]["max_completion_tokens"] == 8


def test_stream_adds_up_to_the_invoke(chat, recorder):
    llm = chat(stream_usage=True)
    whole = llm.invoke(PROMPT)
    chunks = list(llm.stream(PROMPT))
    streamed = chunks[0]
    for chunk in chunks[1:]:
        streamed += chunk
    assert len(chunks) > 2 and streamed.content == whole.content
    assert streamed.usage_metadata == whole.usage_metadata
    assert recorder.bodies[-1]["stream"] is True
    assert recorder.bodies[-1]["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("tool_choice", ["GetWeather", "any"])  # sent as a named function, and as "required"
def test_forced_tool_choice_gives_a_valid_call(chat, tool_choice):
    # One call: a random model given the choice would go on adding calls until max_tokens.
    message = chat(max_tokens=90).bind_tools([GetWeather], tool_choice=tool_choice, parallel_tool_calls=False).invoke(
        "What is the weather in Oslo?")
    assert message.invalid_tool_calls == [] and message.tool_calls
    for call in message.tool_calls:
        assert call["name"] == "GetWeather"
        GetWeather.model_validate(call["args"])  # raises unless the arguments fit the schema


def test_strict_tool_without_parallel_calls_gives_one_call(chat, recorder):
    message = chat(max_tokens=90).bind_tools([GetWeather], tool_choice="any", strict=True,
                                             parallel_tool_calls=False).invoke("What is the weather in Oslo?")
    body = recorder.bodies[-1]
    assert body["parallel_tool_calls"] is False and body["tools"][0]["function"]["strict"] is True
    assert len(message.tool_calls) == 1
    GetWeather.model_validate(message.tool_calls[0]["args"])


def test_streamed_tool_call_assembles(chat):
    llm = chat(max_tokens=90).bind_tools([GetWeather], tool_choice="GetWeather")
    chunks = list(llm.stream("What is the weather in Lima?"))
    streamed = chunks[0]
    for chunk in chunks[1:]:
        streamed += chunk
    assert streamed.invalid_tool_calls == []
    assert len(streamed.tool_calls) == 1 and streamed.tool_calls[0]["name"] == "GetWeather"
    GetWeather.model_validate(streamed.tool_calls[0]["args"])


def test_auto_tool_choice_is_accepted(engine, serve, recorder):
    """A random model rarely calls the tool on its own: this checks that the request is answered (the ChatML
    model's template names no tool-call format, so the server is told one)."""
    with serve(engine, tool_call_parser="hermes") as running:
        llm = langchain_openai.ChatOpenAI(base_url=f"{running.url}/v1", api_key="unused", model=running.model,
                                          temperature=0, max_retries=0, max_tokens=8, http_client=recorder.client())
        message = llm.bind_tools([GetWeather], tool_choice="auto").invoke("What is the weather in Paris?")
    assert message.response_metadata["finish_reason"] in ("stop", "length", "tool_calls")
    assert recorder.bodies[-1]["tool_choice"] == "auto"


def test_structured_output_by_json_schema(chat, recorder):
    forecast = chat(max_tokens=90).with_structured_output(Forecast, method="json_schema").invoke("Forecast?")
    assert isinstance(forecast, Forecast)
    fmt = recorder.bodies[-1]["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True


def test_structured_output_by_function_calling(chat, recorder):
    # A named tool_choice and parallel_tool_calls: false.
    forecast = chat(max_tokens=90).with_structured_output(Forecast, method="function_calling").invoke("Forecast?")
    assert isinstance(forecast, Forecast)
    assert recorder.bodies[-1]["parallel_tool_calls"] is False
