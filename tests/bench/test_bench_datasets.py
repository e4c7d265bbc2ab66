"""Dataset replay: ShareGPT conversations as vLLM reads them (first human turn, the gpt answer's length as
max_tokens), and a timed trace whose requests go out at their timestamps."""

from __future__ import annotations

import importlib.util
import json

import pytest

from llmctl.bench import datasets

needs_locust = pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="needs locust (llmctl[bench])")


def turn(who: str, n: int, word: str = "the") -> dict:
    return {"from": who, "value": " ".join([word] * n)}


CONVERSATIONS = [
    {"id": "a", "conversations": [turn("human", 6), turn("gpt", 5, "of"), turn("human", 3), turn("gpt", 9)]},
    {"id": "b", "conversations": [turn("system", 4), turn("human", 8, "and"), turn("gpt", 7, "to")]},
    {"id": "no answer", "conversations": [turn("human", 6)]},
    {"id": "short answer", "conversations": [turn("human", 6), turn("gpt", 2)]},
    {"id": "too long", "conversations": [turn("human", 1100), turn("gpt", 5)]},
    {"id": "not a conversation"},
]


def words(texts: list[str]) -> list[int]:
    return [len(text.split()) for text in texts]


def test_sharegpt_takes_the_first_human_turn_and_the_answers_length(tmp_path):
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(CONVERSATIONS))
    items = datasets.sharegpt(path, 10, seed=0, count=words)
    assert sorted((len(i["prompt"].split()), i["max_tokens"]) for i in items) == [(6, 5), (8, 7)]
    jsonl = tmp_path / "sharegpt.jsonl"
    jsonl.write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS))
    assert len(datasets.sharegpt(jsonl, 1, seed=0, count=words)) == 1
    assert {i["max_tokens"] for i in datasets.sharegpt(path, 10, 0, words, output_len=12)} == {12}
    path.write_text(json.dumps(CONVERSATIONS[2:]))
    with pytest.raises(ValueError, match="no usable ShareGPT conversation"):
        datasets.sharegpt(path, 10, 0, words)


@needs_locust
def test_sharegpt_replay_sends_the_prompts_and_lengths(stub, run_bench, served_model, tmp_path):
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(CONVERSATIONS))
    out = tmp_path / "out"
    result = run_bench("serve", "--base-url", stub(), "--model", "stub", "--tokenizer", served_model,
                       "--dataset-name", "sharegpt", "--dataset-path", path, "--num-prompts", 5, "--out", out)
    assert result.exit_code == 0, result.output
    asked = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert sorted((item["prompt_tokens"], item["body"]["max_tokens"]) for item in asked) == [(6, 5), (8, 7)]
    report = json.loads((out / "report.json").read_text())
    assert report["summary"]["requests"] == report["summary"]["ok"] == 5  # two conversations, cycled
    for record in report["records"]:  # the stub streams max_tokens tokens
        assert record["output_tokens"] == asked[record["id"] % 2]["body"]["max_tokens"]
    assert report["config"]["dataset"] == "sharegpt"


TRACE = [(100.0, 12, 3), (101.5, 5, 2), (100.5, 20, 4), (101.0, 8, 1)]  # timestamp, input, output; unsorted


@needs_locust
def test_a_trace_is_sent_at_its_times(stub, run_bench, served_model, tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps({"timestamp": t, "input_length": i, "output_length": o}) + "\n"
                            for t, i, o in TRACE))
    out = tmp_path / "out"
    result = run_bench("serve", "--base-url", stub(), "--model", "stub", "--tokenizer", served_model,
                       "--dataset-name", "trace", "--dataset-path", path, "--out", out)
    assert result.exit_code == 0, result.output
    expected = sorted(TRACE)
    asked = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert [(item["at"], item["prompt_tokens"], item["body"]["max_tokens"]) for item in asked] == \
        [(t - 100.0, i, o) for t, i, o in expected]
    rs = sorted(json.loads((out / "report.json").read_text())["records"], key=lambda r: r["id"])
    assert [r["output_tokens"] for r in rs] == [o for _, _, o in expected]
    starts = [r["start"] - rs[0]["start"] for r in rs]
    assert starts == pytest.approx([t - 100.0 for t, _, _ in expected], abs=0.1), starts


@pytest.mark.parametrize("line, message", [
    ('{"timestamp": 1, "input_length": 4}', ":2: needs \"timestamp\""),
    ('{"timestamp": -1, "input_length": 4, "output_length": 2}', ":2: needs \"timestamp\""),
    ('{"timestamp": 1, "input_length": 0, "output_length": 2}', ":2: needs \"timestamp\""),
    ("{oops", ":2: not JSON"),
])
def test_a_bad_trace_line_is_named(tmp_path, line, message):
    path = tmp_path / "trace.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 4, "output_length": 2}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        datasets.trace(path)


@needs_locust
def test_a_bad_trace_is_one_line_before_any_load(run_bench, tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_text('{"timestamp": "soon", "input_length": 4, "output_length": 2}\n')
    out = tmp_path / "out"
    result = run_bench("serve", "--base-url", "http://127.0.0.1:9", "--model", "m", "--dataset-name", "trace",
                       "--dataset-path", path, "--out", out)
    assert result.exit_code == 1 and result.output == f"error: {path}:1: needs \"timestamp\" (seconds, >= 0), " \
        "\"input_length\" and \"output_length\" (integers >= 1)\n", result.output
    assert not out.exists()


@needs_locust
@pytest.mark.parametrize("args, message", [
    (["--rate-type", "poisson", "--request-rate", 2], "a trace is sent at its own times: leave out --rate-type"),
    (["--warmup", 2], "a trace replays its own requests: give no warm-up"),
])
def test_a_trace_refuses_a_load_of_its_own(run_bench, tmp_path, args, message):
    path = tmp_path / "trace.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 4, "output_length": 2}\n')
    out = tmp_path / "out"
    result = run_bench("serve", "--base-url", "http://127.0.0.1:9", "--model", "m", "--dataset-name", "trace",
                       "--dataset-path", path, "--out", out, *args)
    assert result.exit_code == 1 and result.output == f"error: {message}\n", result.output
