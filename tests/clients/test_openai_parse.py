"""The openai SDK's structured-output helpers: `chat.completions.parse` turns a Pydantic model into a strict
json_schema response_format (or strict function tools) and parses the answer back into the model."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel, Field

openai = pytest.importorskip("openai")

MESSAGES = [{"role": "user", "content": "What is the weather in Oslo?"}]


class Forecast(BaseModel):
    """A weather forecast."""

    city: Literal["Paris", "Oslo", "Lima"]  # an enum keeps a random model's answer short
    rain: bool


class GetWeather(BaseModel):
    """Get the weather in a city."""

    city: Literal["Paris", "Oslo", "Lima"] = Field(description="the city")


@pytest.fixture
def client(server, recorder):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                         http_client=recorder.client())


def test_parse_gives_the_pydantic_model(client, recorder):
    completion = client.chat.completions.parse(model="tiny", messages=MESSAGES, response_format=Forecast,
                                               max_tokens=90, temperature=0)
    message = completion.choices[0].message
    assert isinstance(message.parsed, Forecast) and message.refusal is None
    assert Forecast.model_validate_json(message.content) == message.parsed
    schema = recorder.bodies[-1]["response_format"]["json_schema"]
    assert schema["name"] == "Forecast" and schema["strict"] is True
    assert schema["schema"]["additionalProperties"] is False


def test_parse_gives_strict_tool_arguments(client, recorder):
    completion = client.chat.completions.parse(
        model="tiny", messages=MESSAGES, tools=[openai.pydantic_function_tool(GetWeather)],
        tool_choice={"type": "function", "function": {"name": "GetWeather"}}, max_tokens=90, temperature=0)
    [call] = completion.choices[0].message.tool_calls
    assert call.function.name == "GetWeather" and isinstance(call.function.parsed_arguments, GetWeather)
    assert recorder.bodies[-1]["tools"][0]["function"]["strict"] is True
