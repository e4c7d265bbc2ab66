"""min_tokens (vLLM's field): no eos, stop token or stop string ends an output before it has that many tokens."""

from __future__ import annotations

from dataclasses import replace

import pytest

from llmctl.runtime.llm import LLM
from llmctl.runtime.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", max_num_seqs=8)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_stop_tokens_and_strings_wait_for_min_tokens(llm, temperature):
    prompt = "x = 1\n"
    first = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=1))[0].outputs[0].token_ids[0]
    base = SamplingParams(temperature=temperature, seed=3, max_tokens=40, stop_token_ids=[first])
    if temperature == 0.0:  # greedy stops on its very first token without min_tokens
        short = llm.generate(prompt, base)[0].outputs[0]
        assert short.finish_reason == "stop" and short.token_ids in ([], [first])
    outs = [r.outputs[0] for r in llm.generate([prompt] * 4, [replace(base, min_tokens=k) for k in (1, 5, 12, 40)])]
    for k, out in zip((1, 5, 12, 40), outs):
        assert len(out.token_ids) >= k and first not in out.token_ids[:k], (k, out.token_ids)
        if out.finish_reason == "stop":  # the first stop after min_tokens still ends it
            assert first not in out.token_ids[k:] or out.token_ids[-1] == first

    text = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=30))[0].outputs[0].text
    stop = text[:2]  # a stop string the output hits at once
    assert llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=30, stop=[stop]))[0].outputs[0].text == ""
    held = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=30, stop=[stop], min_tokens=8))[0].outputs[0]
    assert len(held.token_ids) >= 8


def test_bad_min_tokens_are_errors():
    with pytest.raises(ValueError, match=r"min_tokens \(20\) must not exceed max_tokens \(10\)"):
        SamplingParams(max_tokens=10, min_tokens=20)
    with pytest.raises(ValueError, match="min_tokens must be non-negative"):
        SamplingParams(min_tokens=-1)
