"""`--input-len N` sends prompts of exactly N tokens as the server counts them (special tokens and chat
template included) wherever a tokenizer is at hand: the model's tokenizer files, or the server's /tokenize.
Without one, prompts are common words, about a token each, and the bench says so."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from llmctl.bench.tokens import FileTokens
from llmctl.bench.workload import Lengths, WorkloadSpec, build_requests

needs_locust = pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="needs locust (llmctl[bench])")


def asked(out) -> list[dict]:
    return [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]


def test_random_prompts_are_exact_with_tokenizer_files(split_model):
    """The word-piece tokenizer adds a BOS and cuts the longer words in two: a word is not a token."""
    tokens = FileTokens.load(split_model)
    tok = tokens.tokenizer
    spec = WorkloadSpec(Lengths.parse("uniform:3,40"), Lengths.parse("4"), shared_prefix=6, num_prompts=40)
    items = build_requests(spec, "m", tokens)
    for item in items:
        assert len(tok(item["body"]["prompt"])["input_ids"]) == item["prompt_tokens"] == item["asked_tokens"]
        assert 6 + 3 <= item["asked_tokens"] <= 6 + 40
    assert any(len(item["body"]["prompt"].split()) != item["prompt_tokens"] for item in items)  # words are not tokens
    assert len({item["asked_tokens"] for item in items}) > 10
    common = os.path.commonprefix([item["body"]["prompt"] for item in items])
    assert len(tok(common[: common.rfind(" ")], add_special_tokens=False)["input_ids"]) == 6  # one shared prefix
    chat = build_requests(WorkloadSpec(Lengths.parse("12"), Lengths.parse("4"), chat=True, num_prompts=5), "m", tokens)
    for item in chat:
        rendered = tok.apply_chat_template(item["body"]["messages"], add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
        assert len(rendered) == item["prompt_tokens"] == 12


def test_exact_with_a_byte_level_bpe(tmp_path):
    """The reference model's own tokenizer: a small BPE vocabulary, so a word of the list can be two tokens or
    three, and the first word of a prompt (no space before it) is cut otherwise than the rest."""
    from llmctl.reference import default_model_path

    tokens = FileTokens.load(str(default_model_path()))
    for chat in (False, True):
        spec = WorkloadSpec(Lengths.parse("uniform:12,400"), Lengths.parse("4"), chat=chat, shared_prefix=9,
                            num_prompts=40, seed=3)
        items = build_requests(spec, "m", tokens)
        assert [item["prompt_tokens"] for item in items] == [item["asked_tokens"] for item in items]
        assert all(tokens.prompt_tokens(item["body"]) == item["asked_tokens"] for item in items)


def test_a_length_below_the_chat_template_is_kept_closest_and_marked(split_model):
    tokens = FileTokens.load(split_model)
    # "<s> user: WORD assistant:" is four tokens at the least.
    items = build_requests(WorkloadSpec(Lengths.parse("2"), Lengths.parse("4"), chat=True, num_prompts=3), "m",
                           tokens)
    assert all(item["asked_tokens"] == 2 and item["prompt_tokens"] == 4 for item in items)


@needs_locust
def test_prompts_are_exact_through_the_servers_tokenize(llmctl_server, run_bench, tmp_path):
    """No tokenizer files (the model is a name, not a directory): the bench asks the server's /tokenize."""
    result = run_bench("serve", "--url", llmctl_server.url, "--model", llmctl_server.model, "--requests", 6,
                       "--concurrency", 2, "--input-len", "uniform:5,40", "--shared-prefix", 4, "--output-len", 2,
                       "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "approximate" not in result.output
    items = asked(tmp_path)
    for item in items:
        assert llmctl_server.count(item["body"]) == item["prompt_tokens"] == item["asked_tokens"]
        assert 4 + 5 <= item["asked_tokens"] <= 4 + 40
    assert any(len(item["body"]["prompt"].split()) != item["prompt_tokens"] for item in items)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["tokenizer"] == f"{llmctl_server.url}/tokenize"
    for record in report["records"]:  # the server's own usage agrees
        assert record["status"] == "ok" and record["prompt_tokens"] == items[record["id"]]["asked_tokens"]


@needs_locust
def test_chat_prompts_are_exact_through_the_servers_tokenize(llmctl_server, run_bench, tmp_path):
    result = run_bench("serve", "--url", llmctl_server.url, "--model", llmctl_server.model, "--endpoint", "/v1/chat/completions",
                       "--requests", 3, "--input-len", 20, "--output-len", 2, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    for item in asked(tmp_path):
        assert llmctl_server.count(item["body"]) == item["prompt_tokens"] == 20


@needs_locust
def test_without_a_tokenizer_lengths_are_approximate_and_the_bench_says_so(stub, run_bench, tmp_path):
    """The stub has no /tokenize and --model names no directory."""
    result = run_bench("serve", "--url", stub(), "--model", "stub", "--requests", 2, "--input-len", 16,
                       "--output-len", 2, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "--input-len is approximate" in warning[0], result.stderr
    assert all(len(item["body"]["prompt"].split()) == 16 and item["prompt_tokens"] is None
               for item in asked(tmp_path))
