"""The official `openai` SDK, sync and async, streaming and not, against the tiny model on CPU."""

from __future__ import annotations

import asyncio

import pytest

openai = pytest.importorskip("openai")

GREEDY = dict(temperature=0.0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def run_async(server, use):
    """use(client) with an AsyncOpenAI client of its own: a client's connections belong to one event loop."""
    async def main():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
            return await use(client)

    return asyncio.run(main())


def test_completion_and_its_stream_agree(client, engine):
    prompt = "def encode(self, o):"
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, **GREEDY)
    choice = whole.choices[0]
    assert whole.object == "text_completion" and whole.model == "tiny" and whole.id.startswith("cmpl-")
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    assert whole.usage.prompt_tokens == len(engine.tokenizer.encode(prompt))
    assert whole.usage.completion_tokens == 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 12

    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_prompt_forms_give_prompt_major_choices(client, engine):
    texts = ["class JSONEncoder(object):", "import re"]
    ids = [engine.tokenizer.encode(t) for t in texts]
    by_text = client.completions.create(model="tiny", prompt=texts, n=2, max_tokens=6, **GREEDY)
    by_ids = client.completions.create(model="tiny", prompt=ids, n=2, max_tokens=6, **GREEDY)
    one = client.completions.create(model="tiny", prompt=ids[1], max_tokens=6, **GREEDY)
    assert [c.index for c in by_text.choices] == [0, 1, 2, 3]
    assert [c.text for c in by_text.choices] == [c.text for c in by_ids.choices]
    # Greedy: both samples of a prompt agree, and choices 2 and 3 belong to the second prompt.
    assert by_text.choices[2].text == by_text.choices[3].text == one.choices[0].text
    assert by_text.choices[0].text != by_text.choices[2].text
    assert by_text.usage.prompt_tokens == sum(len(i) for i in ids)
    assert by_text.usage.completion_tokens == 4 * 6


def test_stop_string_ends_the_text_before_it(client):
    full = client.completions.create(model="tiny", prompt="def decode(s):", max_tokens=16, **GREEDY)
    text = full.choices[0].text
    stop = text[len(text) // 2:][:3]
    cut = client.completions.create(model="tiny", prompt="def decode(s):", max_tokens=16, stop=[stop],
                                    **GREEDY).choices[0]
    assert cut.finish_reason == "stop" and cut.text == text[: text.index(stop)]
    assert cut.model_extra["stop_reason"] == stop


def test_completion_logprobs(client):
    out = client.completions.create(model="tiny", prompt="return", max_tokens=5, logprobs=3, **GREEDY)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    # Greedy: the chosen token is the most likely one, so its logprob is the top one.
    assert all(abs(max(top.values()) - x) < 1e-5 for top, x in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]


def test_chat_with_seeded_samples_streams_what_it_returns(client, server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]
    args = dict(model="tiny", messages=messages, n=2, seed=7, temperature=1.0, max_completion_tokens=8,
                extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**args)
    assert whole.object == "chat.completion" and [c.index for c in whole.choices] == [0, 1]
    assert all(c.message.role == "assistant" and c.finish_reason == "length" for c in whole.choices)
    assert whole.usage.completion_tokens == 16

    async def stream(aclient):
        texts, roles = ["", ""], [None, None]
        async for chunk in await aclient.chat.completions.create(stream=True, **args):
            assert chunk.object == "chat.completion.chunk"
            for c in chunk.choices:
                roles[c.index] = roles[c.index] or c.delta.role
                texts[c.index] += c.delta.content or ""
        return texts, roles

    texts, roles = run_async(server, stream)
    assert roles == ["assistant", "assistant"]
    assert texts == [c.message.content for c in whole.choices]
    assert whole.choices[0].message.content != whole.choices[1].message.content  # seeds 7 and 8


def test_chat_logprobs(client):
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=4, logprobs=True, top_logprobs=2, **GREEDY)
    content = out.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.bytes == list(entry.token.encode())
        assert abs(entry.top_logprobs[0].logprob - entry.logprob) < 1e-5


def test_async_completions_run_concurrently(server):
    async def main(aclient):
        return await asyncio.gather(*(aclient.completions.create(model="tiny", prompt=f"x = {i}",
                                                                 max_tokens=4, **GREEDY) for i in range(8)))

    outs = run_async(server, main)
    assert all(o.choices[0].finish_reason == "length" and o.usage.completion_tokens == 4 for o in outs)


def test_models(client, engine):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    card = models[0].model_dump()  # vLLM's extra fields, which GuideLLM and vLLM's bench read
    assert card["max_model_len"] == 128 and card["root"] == str(engine.engine.config.model) and card["parent"] is None
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_logit_bias_through_the_sdk(client, engine):
    """Completions and chat: +100 on one token makes every generated token that one; -100 bans one."""
    token = engine.tokenizer.encode(" the")[-1]
    forced = client.completions.create(model="tiny", prompt="import os", max_tokens=4, logprobs=0,
                                       logit_bias={str(token): 100}, **GREEDY)
    assert engine.tokenizer.encode(forced.choices[0].text, add_special_tokens=False) == [token] * 4
    free = client.completions.create(model="tiny", prompt="import os", max_tokens=4, **GREEDY)
    first = engine.tokenizer.encode(free.choices[0].text, add_special_tokens=False)[0]
    banned = client.completions.create(model="tiny", prompt="import os", max_tokens=4,
                                       logit_bias={str(first): -100}, **GREEDY)
    assert engine.tokenizer.encode(banned.choices[0].text, add_special_tokens=False)[0] != first
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          logit_bias={str(token): 100}, **GREEDY)
    assert engine.tokenizer.encode(chat.choices[0].message.content, add_special_tokens=False) == [token] * 3


def test_min_tokens_through_the_sdk(client, engine):
    """vLLM's min_tokens: a stop token the output would end on at once waits until min_tokens are out."""
    free = client.completions.create(model="tiny", prompt="import os", max_tokens=4, **GREEDY)
    first = engine.tokenizer.encode(free.choices[0].text, add_special_tokens=False)[0]
    ask = dict(model="tiny", prompt="import os", max_tokens=20, temperature=0.0)
    short = client.completions.create(**ask, extra_body={"stop_token_ids": [first]})
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens <= 1
    held = client.completions.create(**ask, extra_body={"stop_token_ids": [first], "min_tokens": 6})
    assert held.usage.completion_tokens >= 6
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                          temperature=0.0, extra_body={"min_tokens": 8})
    assert chat.usage.completion_tokens == 8
