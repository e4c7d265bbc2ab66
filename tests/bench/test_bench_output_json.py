"""`--output json` on the bench commands: one document on stdout with the result, nothing else there; the exit
code still tells a failed run."""

from __future__ import annotations

import json

from test_bench_compare import report
from test_bench_exit import needs_locust


@needs_locust
def test_serve_emits_its_summary_and_files_even_when_a_threshold_is_crossed(stub, run_bench, tmp_path):
    url = stub("100", "10")
    result = run_bench("serve", "--url", url, "--model", "stub", "--requests", 4, "--output-len", 4,
                       "--fail-on", "p99_ttft_ms=20", "--out", tmp_path, "--output", "json")
    assert result.exit_code == 4, result.output
    doc = json.loads(result.stdout)  # no tables, progress or "wrote" lines on stdout
    assert doc["summary"]["ok"] == 4 and doc["summary"]["ttft_ms"]["p99"] >= 100
    assert str(tmp_path / "report.json") in doc["written"]
    assert "p99_ttft_ms" in result.stderr  # the verdict, on stderr


def test_compare_emits_rows_and_mismatches(run_bench, tmp_path):
    for name, data in (("a", report(100)), ("b", report(200))):
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    result = run_bench("compare", tmp_path / "a.json", tmp_path / "b.json", "--output", "json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["mismatches"] == []
    row = next(r for r in doc["rows"] if r["metric"] == "TTFT mean ms")
    assert row["verdict"] == "worse" and 0.9 < row["change"] < 1.1 and row["ci_a"]


def test_throughput_emits_its_results(run_bench):
    result = run_bench("throughput", "--requests", 4, "--min-len", 4, "--max-len", 8, "--dtype", "float32",
                       "--output", "json")
    assert result.exit_code == 0, result.output
    [run] = json.loads(result.stdout)["results"]
    assert run["requests"] == 4 and run["output_tokens"] > 0 and run["output_tokens_per_second"] > 0
