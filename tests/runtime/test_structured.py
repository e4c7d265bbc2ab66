"""Structured outputs in the engine, on the reference model (a real tokenizer): every finished output is valid
against its schema (hypothesis-generated, 200 schemas), regexes, choices and grammars hold, and matchers
survive preemption and the step overlap."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmctl.runtime.llm import LLM
from llmctl.runtime.sampling_params import SamplingParams
from llmctl.runtime.structured import StructuredOutput

jsonschema = pytest.importorskip("jsonschema")
NAMES = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=6)


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", max_num_seqs=16)


def leaf():
    return st.one_of(
        st.just({"type": "boolean"}), st.just({"type": "null"}),
        st.integers(-50, 50).flatmap(lambda lo: st.integers(lo, lo + 999).map(
            lambda hi: {"type": "integer", "minimum": lo, "maximum": hi})),
        st.lists(NAMES, min_size=1, max_size=4, unique=True).map(lambda e: {"enum": e}),
        st.integers(0, 6).map(lambda n: {"type": "string", "maxLength": n}),
        # (no "format": llguidance's date takes year 0000, which RFC 3339 allows and Python's checker does not)
        st.sampled_from([{"type": "string", "pattern": "^[a-f0-9]{2,4}$"}, {"const": "fixed"}]),
    )


def objects(children):
    return st.dictionaries(NAMES, children, min_size=1, max_size=4).flatmap(lambda props: st.sets(
        st.sampled_from(sorted(props))).map(lambda required: {
            "type": "object", "properties": props, "required": sorted(required), "additionalProperties": False}))


SCHEMAS = st.recursive(leaf(), lambda children: st.one_of(
    objects(children),
    children.map(lambda items: {"type": "array", "items": items, "maxItems": 3}),
    st.lists(children, min_size=2, max_size=3).map(lambda options: {"anyOf": options}),
), max_leaves=8)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(SCHEMAS, min_size=10, max_size=10), st.integers(0, 2**32))
def test_every_finished_output_is_valid_against_its_schema(llm, schemas, seed):
    """20 examples x 10 schemas = 200 schemas, sampled at temperature 1 in one batch each."""
    params = [SamplingParams(temperature=1.0, seed=seed + i, max_tokens=200,
                             structured=StructuredOutput.json_schema(schema)) for i, schema in enumerate(schemas)]
    results = llm.generate(["# data as JSON\nvalue = "] * len(schemas), params)
    finished = 0
    for schema, result in zip(schemas, results):
        out = result.outputs[0]
        if out.finish_reason == "length":
            continue
        assert out.finish_reason == "stop"
        jsonschema.validate(json.loads(out.text), schema, format_checker=jsonschema.FormatChecker())
        finished += 1
    assert finished >= 7  # a random walk may run to max_tokens inside a string; most end


def test_regex_choice_and_grammar_hold(llm):
    specs = [StructuredOutput("regex", r"[0-9]{3}-[0-9]{4}"), StructuredOutput.choice(["def", "class", "lambda x"]),
             StructuredOutput("grammar", 'start: "(" NUMBER ("," NUMBER)~0..3 ")"\n%import common.NUMBER'),
             StructuredOutput("grammar", 'root ::= "yes" | "no"'), StructuredOutput("json_object")]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=60, structured=s) for i, s in enumerate(specs)]
    out = [r.outputs[0] for r in llm.generate(["x = "] * len(specs), params)]
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", out[0].text) and out[0].finish_reason == "stop"
    assert out[1].text in ("def", "class", "lambda x")
    assert re.fullmatch(r"\(\d+(\.\d+)?(,\d+(\.\d+)?){0,3}\)", out[2].text)
    assert out[3].text in ("yes", "no")
    assert isinstance(json.loads(out[4].text), dict)


def test_matchers_survive_preemption_and_greedy_outputs_do_not_change():
    """A cache of 5 blocks of 16 tokens for 8 sequences: sequences are preempted and recomputed mid-object, and
    each greedy output equals the one it gives alone."""
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
              "tags": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "maxItems": 3}},
              "required": ["name", "tags"], "additionalProperties": False}
    spec = StructuredOutput.json_schema(schema)
    prompts = [f"# record {i}\nrecord = " for i in range(8)]
    greedy = SamplingParams(temperature=0.0, max_tokens=40, structured=spec)
    block_bytes = 2 * 6 * 16 * 2 * 64 * 4  # K and V, 6 layers, 16 tokens, 2 KV heads of 64, fp32
    tight = LLM(dtype="float32", kv_cache_memory=5 * block_bytes, max_model_len=64, max_num_seqs=8)
    together = tight.generate(prompts, greedy)
    assert tight.engine.scheduler.num_preemptions > 0
    alone = LLM(dtype="float32")
    for prompt, result in zip(prompts, together):
        assert result.outputs[0].token_ids == alone.generate(prompt, greedy)[0].outputs[0].token_ids
        if result.outputs[0].finish_reason == "stop":
            jsonschema.validate(json.loads(result.outputs[0].text), schema)


def test_unenforceable_specs_are_errors_that_name_the_problem(llm):
    with pytest.raises(ValueError, match="JSON schema cannot be enforced.*uniqueItems"):
        llm.generate("x", SamplingParams(structured=StructuredOutput.json_schema({"type": "array", "uniqueItems": True})))
    lenient = StructuredOutput.json_schema({"type": "array", "items": {"type": "integer"}, "uniqueItems": True,
                                            "maxItems": 2}, strict=False)
    out = llm.generate("x = ", SamplingParams(temperature=0.0, max_tokens=30, structured=lenient))[0].outputs[0]
    assert isinstance(json.loads(out.text), list)
    with pytest.raises(ValueError, match="structured output kind"):
        StructuredOutput("yaml", "")


def test_the_mask_fill_is_running_when_start_fill_returns(llm):
    """The engine thread goes straight on to Python work after start_fill; a worker that had not started by
    then would wait for the GIL until that work ends, and the fill would overlap nothing."""
    import sys

    import torch

    grammars = llm.engine.grammars
    entered = []
    fill = grammars.fill
    grammars.fill = lambda matchers, bitmask: (entered.append(len(matchers)), fill(matchers, bitmask))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(30.0)  # no forced GIL hand-over in the test: only a blocking call lets the worker run
    try:
        matcher = grammars.matcher(StructuredOutput("regex", "[ab]+"))
        bitmask = torch.zeros((1, grammars.words), dtype=torch.int32)
        for attempt in range(20):
            future = grammars.start_fill([matcher], bitmask)
            assert len(entered) == attempt + 1  # no blocking call in between: the worker ran on its own
            future.result()
    finally:
        sys.setswitchinterval(interval)
        del grammars.fill
    allowed = [t for t in range(llm.engine.vocab_size) if bitmask[0, t // 32] >> (t % 32) & 1]
    assert allowed and all(re.fullmatch("[ab]+", llm.tokenizer.decode([t])) for t in allowed)
