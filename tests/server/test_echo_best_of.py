"""/v1/completions `echo` (with prompt logprobs, what evaluation harnesses read) and `best_of`, through the
openai SDK, checked against transformers' own log-probabilities for the same tiny model."""

from __future__ import annotations

import math

import pytest

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def hf_logprobs(chat_model):
    """Per position p of a prompt: log P(token p + 1 | tokens up to p), and the log-softmax rows, from
    transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(chat_model, dtype=torch.float32).eval()

    def score(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)

    return score


def test_echo_returns_the_prompt_and_its_logprobs(client, engine, hf_logprobs):
    prompt = "def decode(self, s, _w=WHITESPACE.match):"
    ids = engine.tokenizer.encode(prompt)
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, echo=True, logprobs=2,
                                    temperature=0.0, extra_body={"ignore_eos": True})
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0.0,
                                      extra_body={"ignore_eos": True})
    choice = out.choices[0]
    assert choice.text == prompt + plain.choices[0].text
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 3 == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    rows = hf_logprobs(ids)
    for p in range(len(ids) - 1):
        assert math.isclose(lp.token_logprobs[p + 1], rows[p, ids[p + 1]].item(), abs_tol=1e-4)
        top = rows[p].topk(2)
        assert sorted(lp.top_logprobs[p + 1].values(), reverse=True) == pytest.approx(top.values.tolist(), abs=1e-4)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 3


def test_echo_token_prompts_batched_and_streamed(client, engine, hf_logprobs):
    """lm-eval's shape: token-id prompts, a batch, one token, logprobs=1; and the same streamed."""
    texts = ["import json", "class JSONDecodeError(ValueError):"]
    ids = [engine.tokenizer.encode(t) for t in texts]
    out = client.completions.create(model="tiny", prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0.0)
    for choice, prompt in zip(out.choices, ids):
        rows = hf_logprobs(prompt)
        expected = [rows[p, prompt[p + 1]].item() for p in range(len(prompt) - 1)]
        assert choice.logprobs.token_logprobs[1:len(prompt)] == pytest.approx(expected, abs=1e-4)
        assert choice.text.startswith(engine.tokenizer.decode(prompt))
    chunks = list(client.completions.create(model="tiny", prompt=texts[1], max_tokens=4, echo=True, logprobs=1,
                                            temperature=0.0, stream=True, extra_body={"ignore_eos": True}))
    whole = client.completions.create(model="tiny", prompt=texts[1], max_tokens=4, echo=True, logprobs=1,
                                      temperature=0.0, extra_body={"ignore_eos": True}).choices[0]
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    streamed = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert streamed == whole.logprobs.token_logprobs


def test_echo_without_logprobs_and_prompt_logprobs_survive_chunking(new_engine, serve, engine, hf_logprobs):
    """A prompt computed in chunks of 8 tokens, and never read from the prefix cache (an identical prompt was
    just cached): every position is still scored exactly once."""
    small = new_engine(max_num_batched_tokens=8)
    with serve(small) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="x", max_retries=0)
        prompt = "def raw_decode(self, s, idx=0): return self.scan_once(s, idx)"
        ids = engine.tokenizer.encode(prompt)
        first = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, echo=True)
        assert first.choices[0].text.startswith(prompt) and first.choices[0].logprobs is None
        again = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, echo=True, logprobs=0)
        rows = hf_logprobs(ids)
        expected = [rows[p, ids[p + 1]].item() for p in range(len(ids) - 1)]
        assert again.choices[0].logprobs.token_logprobs[1:len(ids)] == pytest.approx(expected, abs=1e-4)
        assert again.usage.prompt_tokens_details.cached_tokens == 0


def test_best_of_returns_the_most_likely_of_its_samples(client):
    prompt = "def scanstring(s, end, strict=True):"
    out = client.completions.create(model="tiny", prompt=[prompt, "import re"], n=2, best_of=5, max_tokens=6,
                                    temperature=1.0, seed=7, logprobs=0, extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    totals = [sum(c.logprobs.token_logprobs) for c in out.choices]
    assert totals[0] >= totals[1] and totals[2] >= totals[3]
    # The two best of five seeded samples: the same five samples, generated one by one, ranked.
    singles = [client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=1.0, seed=7 + i,
                                         logprobs=0, extra_body={"ignore_eos": True}).choices[0] for i in range(5)]
    ranked = sorted(singles, key=lambda c: sum(c.logprobs.token_logprobs), reverse=True)
    assert [c.text for c in out.choices[:2]] == [c.text for c in ranked[:2]]
    hidden = client.completions.create(model="tiny", prompt=prompt, best_of=3, max_tokens=4, seed=1)
    assert hidden.choices[0].logprobs is None and len(hidden.choices) == 1


def test_max_tokens_0_with_echo_scores_the_prompt_alone(client, engine, hf_logprobs):
    """OpenAI's legacy way to score a prompt: echo, logprobs and max_tokens 0. The engine must make a token;
    the response leaves it out, whole and streamed."""
    prompt = "def decode(self, s, _w=WHITESPACE.match):"
    ids = engine.tokenizer.encode(prompt)
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    choice = out.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == len(ids) and choice.logprobs.token_logprobs[0] is None
    rows = hf_logprobs(ids)
    assert choice.logprobs.token_logprobs[1:] == pytest.approx([rows[p, ids[p + 1]].item()
                                                                for p in range(len(ids) - 1)], abs=1e-4)
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == len(ids)
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == prompt
    assert [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs] \
        == choice.logprobs.token_logprobs
    assert chunks[-1].usage.completion_tokens == 0
    with pytest.raises(openai.BadRequestError, match="max_tokens must be at least 1"):  # without echo: nothing to return
        client.completions.create(model="tiny", prompt=prompt, max_tokens=0)
