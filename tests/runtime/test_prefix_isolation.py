"""Cache salts: only requests with the same salt share prefix-cache blocks, so cached-token counts leak nothing."""

from __future__ import annotations

import pytest

from llmctl.runtime import LLM, SamplingParams

PROMPT = [(13 * i) % 500 + 1 for i in range(40)]  # two full blocks of 16 can be cached, never the last token
PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture
def engine(tiny_models):
    return LLM(tiny_models["llama"], dtype="float32", max_model_len=128).engine


def run(engine, prompt=PROMPT, salt=None):
    """One request to the end: (its tokens, its cached prompt tokens, the blocks it held after its prefill)."""
    seq = engine.add_request(prompt, PARAMS, cache_salt=salt)
    blocks, out = None, None
    while out is None:
        out = next((o for o in engine.step() if o.finished), None)
        blocks = blocks or list(seq.block_table)
    return out.token_ids, out.num_cached_tokens, blocks


def test_a_different_salt_gets_nothing_from_the_cache(engine):
    tokens, cached, blocks = run(engine, salt="alice")
    assert cached == 0
    again, cached, other_blocks = run(engine, salt="bob")
    assert cached == 0 and again == tokens
    assert set(blocks).isdisjoint(other_blocks)


def test_the_same_salt_shares_its_prefix(engine):
    tokens, _, blocks = run(engine, salt="alice")
    again, cached, same_blocks = run(engine, salt="alice")
    assert cached == 32 and again == tokens and same_blocks[:2] == blocks[:2]


def test_salted_and_unsalted_requests_share_nothing(engine):
    run(engine)
    assert run(engine, salt="alice")[1] == 0
    other = PROMPT[::-1]
    run(engine, other, salt="alice")
    assert run(engine, other)[1] == 0


def test_salted_and_unsalted_runs_give_the_same_tokens(tiny_models):
    prompts = [PROMPT, PROMPT[:20] + [3, 3, 3], PROMPT[5:]]
    plain = LLM(tiny_models["llama"], dtype="float32", max_model_len=128)
    expected = [r.outputs[0].token_ids for r in plain.generate(prompts, PARAMS)]
    engine = plain.engine
    ids = [engine.add_request(p, PARAMS, cache_salt=f"tenant-{i % 2}").request_id for i, p in enumerate(prompts)]
    done = {}
    while engine.has_unfinished():
        done.update((o.request_id, o.token_ids) for o in engine.step() if o.finished)
    assert [done[i] for i in ids] == expected


@pytest.mark.parametrize("salt", ["", 42])
def test_a_bad_salt_is_a_value_error(engine, salt):
    with pytest.raises(ValueError, match="cache_salt must be a non-empty string"):
        engine.add_request(PROMPT, PARAMS, cache_salt=salt)
