"""What `llmctl bench serve` exits with, and the line that says why: every request failing is exit 3 with its
most common causes named; some failing is a one-line summary by kind; a crossed --fail-on threshold is exit 4
with the measured value."""

from __future__ import annotations

import importlib.util
import json

import pytest

from llmctl.bench.record import Record
from llmctl.bench.verdict import Threshold, error_causes, errors_line, every_request_failed

needs_locust = pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="needs locust (llmctl[bench])")

SUMMARY = {"requests": 10, "ok": 9, "error_rate": 0.1, "request_throughput": 4.0, "output_throughput": 400.0,
           "goodput": None, "ttft_ms": {"mean": 80.0, "p50": 70.0, "p90": 120.0, "p95": 150.0, "p99": 612.3, "n": 9},
           "tpot_ms": None, "itl_ms": {"mean": 20.0, "p50": 20.0, "p90": 30.0, "p95": 40.0, "p99": 45.0, "n": 90},
           "e2e_ms": {"mean": 900.0, "p50": 800.0, "p90": 1000.0, "p95": 1100.0, "p99": 1200.0, "n": 9}}


def failed(i: int, status: str, error: str, warmup: bool = False) -> Record:
    return Record(id=i, start=0.0, status=status, error=error, e2e=0.1, warmup=warmup)


def test_error_causes_group_messages_that_differ_only_in_numbers():
    records = [failed(i, "http_400", f"maximum context length is 1024 tokens, but the prompt has {1100 + i} tokens")
               for i in range(5)]
    records += [failed(5, "timeout", "no complete answer in 300s"), failed(6, "connection", "reset", warmup=True)]
    records += [Record(id=7, start=0.0, e2e=0.1)]
    assert error_causes(records) == [(5, "http_400", "maximum context length is 1024 tokens, but the prompt has "
                                                     "1100 tokens"), (1, "timeout", "no complete answer in 300s")]
    assert errors_line(records) == ('6 of 7 requests failed: 5 × http_400 "maximum context length is 1024 tokens, '
                                    'but the prompt has 1100 tokens"; 1 × timeout "no complete answer in 300s"')
    assert every_request_failed(records[:5]) and not every_request_failed(records)
    assert errors_line([Record(id=0, start=0.0, e2e=0.1)]) is None


def test_thresholds_parse_and_compare():
    assert Threshold.parse("p99_ttft_ms=500") == Threshold("p99_ttft_ms", 500.0)
    assert Threshold.parse(" error_rate = 0.01 ").limit == 0.01
    crossed = [t.name for t in map(Threshold.parse, ("p99_ttft_ms=500", "p99_itl_ms=50", "error_rate=0.05",
                                                     "min_output_throughput=500", "min_request_throughput=2",
                                                     "mean_tpot_ms=10")) if t.crossed(SUMMARY)]
    # TPOT was not measured (one-token answers): a threshold on it cannot be shown to hold.
    assert crossed == ["p99_ttft_ms", "error_rate", "min_output_throughput", "mean_tpot_ms"]
    assert Threshold.parse("p99_ttft_ms=500").describe(SUMMARY) == "p99_ttft_ms is 612.3, above 500"
    assert Threshold.parse("min_output_throughput=500").describe(SUMMARY) == "output_throughput is 400, below 500"
    assert Threshold.parse("min_request_throughput=2").describe(SUMMARY) == "request_throughput is 4, at least 2"
    assert Threshold.parse("mean_tpot_ms=10").describe(SUMMARY) == "mean_tpot_ms was not measured"
    for bad, message in [("p99_ttft=5", "unknown metric 'p99_ttft'"), ("p99_ttft_ms", "use NAME=LIMIT"),
                         ("p99_ttft_ms=fast", "not a number"), ("error_rate=2", "a fraction from 0 to 1"),
                         ("p50_e2e_ms=-1", "cannot be negative")]:
        with pytest.raises(ValueError, match=message):
            Threshold.parse(bad)
    with pytest.raises(ValueError, match="min_goodput needs --goodput"):
        Threshold.parse("min_goodput=3", slo={})


@needs_locust
def test_every_request_failing_exits_3_and_names_the_cause(llmctl_server, run_bench, tmp_path):
    """The user's trial: prompts longer than the server's context. The report is still written."""
    result = run_bench("serve", "--url", llmctl_server.url, "--model", llmctl_server.model, "--requests", 4,
                       "--concurrency", 2, "--input-len", llmctl_server.max_model_len + 6, "--output-len", 2,
                       "--out", tmp_path)
    assert result.exit_code == 3, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last == (f"error: every one of the 4 requests failed: 4 × http_400 \"this model's maximum context "
                    f"length is {llmctl_server.max_model_len} tokens, but the prompt has "
                    f"{llmctl_server.max_model_len + 6} tokens and max_tokens is 2\" (all in {tmp_path}/report.json)")
    assert json.loads((tmp_path / "report.json").read_text())["summary"]["error_rate"] == 1.0


@needs_locust
def test_some_requests_failing_prints_one_line_by_kind(llmctl_server, run_bench, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in ("the first", "the " * 80, "one")))
    result = run_bench("serve", "--url", llmctl_server.url, "--model", llmctl_server.model, "--requests", 6,
                       "--concurrency", 1, "--prompts", prompts, "--output-len", 2, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert lines == ['warning: 2 of 6 requests failed: 2 × http_400 "this model\'s maximum context length is '
                     f'{llmctl_server.max_model_len} tokens, but the prompt has 81 tokens and max_tokens is 2"'], \
        result.stderr


@needs_locust
def test_fail_on_thresholds_set_the_exit_code(stub, run_bench, tmp_path):
    url = stub("100", "10")  # TTFT 100 ms, ITL 10 ms
    held = run_bench("serve", "--url", url, "--model", "stub", "--requests", 4, "--output-len", 4,
                     "--fail-on", "p99_ttft_ms=2000", "--fail-on", "error_rate=0", "--fail-on", "p99_itl_ms=500",
                     "--out", tmp_path / "held")
    assert held.exit_code == 0, held.output
    assert "--fail-on: all 3 thresholds held" in held.output
    crossed = run_bench("serve", "--url", url, "--model", "stub", "--requests", 4, "--output-len", 4,
                        "--fail-on", "p99_ttft_ms=20", "--fail-on", "error_rate=0", "--fail-on", "p50_itl_ms=1",
                        "--out", tmp_path / "crossed")
    assert crossed.exit_code == 4, crossed.output
    last = crossed.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 2 of 3 --fail-on thresholds crossed: p99_ttft_ms is 1"), last
    assert "above 20; p50_itl_ms is " in last and last.endswith("above 1")
    assert (tmp_path / "crossed" / "report.json").is_file()


def test_help_documents_the_exit_codes(run_bench):
    result = run_bench("serve", "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for code in ("0 ", "1 ", "3 every measured request failed", "4 a --fail-on threshold was crossed"):
        assert code in text, text
