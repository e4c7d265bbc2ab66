"""Workloads: length distributions, prompt files (and their errors), shared prefixes, tokenizer counts."""

from __future__ import annotations

import json
import random
import statistics

import pytest

from llmctl.bench.tokens import FileTokens
from llmctl.bench.workload import Lengths, WorkloadSpec, build_requests, read_prompts


def test_length_distributions():
    rng = random.Random(0)
    assert {Lengths.parse("64").sample(rng) for _ in range(10)} == {64}
    uniform = [Lengths.parse("uniform:10,20").sample(rng) for _ in range(5000)]
    assert min(uniform) == 10 and max(uniform) == 20
    normal = [Lengths.parse("normal:100,10").sample(rng) for _ in range(5000)]
    assert statistics.fmean(normal) == pytest.approx(100, abs=1)
    assert statistics.stdev(normal) == pytest.approx(10, rel=0.05)
    for bad in ("uniform:20,10", "normal:5", "0", "lots", "poisson:3,4"):
        with pytest.raises(ValueError, match=f"{bad!r}"):
            Lengths.parse(bad)


@pytest.mark.parametrize("line, message", [
    ("{not json", ":2: not a JSON object"),
    ('{"text": "hi"}', ':2: needs a string "prompt"'),
    ('{"prompt": "hi", "max_tokens": 0}', ":2: max_tokens must be a positive integer"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', ":2: has chat messages"),
])
def test_malformed_prompt_files_name_the_line(tmp_path, line, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_prompts(path, chat=False)


def test_prompt_file_with_chat_messages_and_a_shared_prefix(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "the first", "max_tokens": 7}) + "\n\n" +
                    json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    spec = WorkloadSpec(Lengths.parse("8"), Lengths.parse("3"), chat=True, prompts_file=path, shared_prefix=4)
    bodies = [b["body"] for b in build_requests(spec, "m")]
    first, second = bodies
    assert first["max_tokens"] == 7 and second["max_tokens"] == 3
    prefix = first["messages"][0]["content"][: -len("the first")]
    assert len(prefix.split()) == 4
    assert second["messages"][0] == {"role": "system", "content": prefix.strip()}
    assert first["stream"] and first["stream_options"] == {"include_usage": True} and first["model"] == "m"


def test_random_prompts_are_counted_with_the_tokenizer(served_model, tmp_path):
    tokens = FileTokens.load(served_model)
    spec = WorkloadSpec(Lengths.parse("uniform:5,40"), Lengths.parse("16"), shared_prefix=10, num_prompts=30)
    items = build_requests(spec, "m", tokens, extra={"ignore_eos": True})
    for item in items:
        assert item["prompt_tokens"] == len(item["body"]["prompt"].split()) == item["asked_tokens"]  # a word a token
        assert 15 <= item["prompt_tokens"] <= 50 and item["body"]["ignore_eos"] is True
    assert len({" ".join(item["body"]["prompt"].split()[:10]) for item in items}) == 1  # one shared prefix
    chat = build_requests(WorkloadSpec(Lengths.parse("6"), Lengths.parse("4"), chat=True, num_prompts=2), "m", tokens)
    assert chat[0]["prompt_tokens"] == 6  # the template's "user: <4 words> assistant:"
    assert len(chat[0]["body"]["messages"][0]["content"].split()) == 4
    with pytest.raises(ValueError, match="cannot load a tokenizer from"):
        FileTokens.load(str(tmp_path / "nowhere"))
