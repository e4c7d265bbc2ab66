"""GuideLLM's sweep: synchronous, then throughput, then constant rates evenly spaced up to the throughput's
achieved rate, --rate benchmarks in all; one combined report (terminal, JSON, HTML) beside each benchmark's own;
--fail-on judged per threshold on one benchmark; bad combinations refused in one line."""

from __future__ import annotations

import json
import math

import pytest
from test_bench_bad_input import refused
from test_bench_exit import needs_locust
from test_bench_html import Page

from llmctl.bench.load import Load
from llmctl.bench.report import Report
from llmctl.bench.sweep import Benchmark, Sweep
from llmctl.bench.verdict import Threshold, sweep_thresholds_line


def finished(sweep: Sweep, rate_type: str, achieved: float, rate: float = math.inf) -> Benchmark:
    """A benchmark as the sweep sees it once run: what matters is the rate it achieved."""
    report = Report({}, {"request_throughput": achieved}, [], [])
    return Benchmark(rate_type, sweep.profile(rate_type, rate), None, report)


def test_the_sequence_is_synchronous_throughput_then_rates_up_to_the_throughputs():
    sweep = Sweep.from_load(Load(rate_type="sweep", request_rate=5, num_prompts=10))
    done = []
    for achieved in (2.0, 11.0, 4.0, 6.0, 8.0):
        step = sweep.next_benchmark(done)
        done.append(finished(sweep, step[0], achieved, step[1]))
    assert [(b.rate_type, b.offered_rate) for b in done] == [
        ("synchronous", None), ("throughput", None), ("constant", 5.0), ("constant", 8.0), ("constant", 11.0)]
    assert sweep.next_benchmark(done) is None  # 5 in all, as GuideLLM's --rate 5
    assert Sweep.from_load(Load(rate_type="sweep")).benchmarks == 10  # GuideLLM's default
    failed = [finished(sweep, "synchronous", 2.0), finished(sweep, "throughput", 0.0)]
    assert sweep.next_benchmark(failed) is None  # no throughput rate: nothing to space rates up to


def test_each_benchmark_has_its_load_and_the_cap_spares_the_synchronous_one():
    sweep = Sweep.from_load(Load(rate_type="sweep", request_rate=3, max_concurrency=4, duration=5.0))
    shapes = {kind: sweep.profile(kind, rate) for kind, rate in
              (("synchronous", math.inf), ("throughput", math.inf), ("constant", 7.5))}
    assert [(p.kind, p.concurrency, p.rate, p.burstiness, p.duration) for p in shapes.values()] == [
        ("constant", 1, 1.0, 1.0, 5.0), ("constant", 4, 1.0, 1.0, 5.0), ("rate", 4, 7.5, math.inf, 5.0)]


@pytest.mark.parametrize("kwargs, message", [
    ({"request_rate": 1}, "at least 2: synchronous and throughput), got 1"),
    ({"request_rate": 4.5}, "got 4.5"),
    ({"max_rate": 20.0}, "--rate-step and --max-rate belong to --rate-type stepped"),
])
def test_bad_sweeps_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Sweep.from_load(Load(rate_type="sweep", **kwargs))


@needs_locust
@pytest.mark.parametrize("args, message", [
    (("--rate", 1), "--rate-type sweep takes --rate N, its benchmarks in all (at least 2"),
    (("--save-result",), "--save-result, --percentile-metrics and --metric-percentiles are vLLM's for one run"),
    (("--max-rate", 30), "--rate-step and --max-rate belong to --rate-type stepped"),
    (("--workers", 2), "a sweep's synchronous benchmark is one user, in one of the 2 --workers"),
    (("--burstiness", 0.5), "--burstiness shapes --request-rate's arrivals"),
])
def test_the_cli_refuses_bad_combinations_in_one_line(run_bench, tmp_path, args, message):
    out = tmp_path / "out"
    refused(run_bench("serve", "--url", "http://127.0.0.1:9", "--model", "m", "--rate-type", "sweep", *args,
                      "--out", out), out, message)


def test_thresholds_are_judged_on_the_best_benchmark_and_errors_on_the_worst():
    summaries = [{"error_rate": 0.0, "request_throughput": 9.0, "ttft_ms": {"p99": 80.0}},
                 {"error_rate": 0.2, "request_throughput": 40.0, "ttft_ms": {"p99": 900.0}},
                 {"error_rate": 0.0, "request_throughput": 30.0, "ttft_ms": {"p99": 300.0}}]
    names = ["01-synchronous", "02-throughput", "03-constant"]
    thresholds = [Threshold.parse("p99_ttft_ms=100"), Threshold.parse("min_request_throughput=35")]
    held, line = sweep_thresholds_line(thresholds, summaries, names)
    assert held and line == ("--fail-on: all 2 thresholds held: p99_ttft_ms is 80, at most 100 (01-synchronous); "
                             "request_throughput is 40, at least 35 (02-throughput)")
    held, line = sweep_thresholds_line([Threshold.parse("error_rate=0.1")], summaries, names)
    assert not held and line == "1 of 1 --fail-on thresholds crossed: error_rate is 0.2, above 0.1 (02-throughput)"


@needs_locust
def test_a_sweep_against_the_stub_writes_one_report_of_every_benchmark(stub, run_bench, tmp_path):
    """Each request takes 100 ms: one at a time makes at most 10 requests/s, five at once several times that."""
    result = run_bench("serve", "--url", stub("100"), "--model", "stub", "--rate-type", "sweep", "--rate", 4,
                       "--num-prompts", 5, "--output-len", 2, "--goodput", "ttft:500", "--out", tmp_path,
                       "--fail-on", "min_request_throughput=20", "--output", "json")
    assert result.exit_code == 0, result.output  # min_request_throughput judged on the best: not 01's 10/s
    doc = json.loads(result.stdout)
    kinds = [(b["directory"], b["rate_type"]) for b in doc["benchmarks"]]
    assert kinds == [("01-synchronous", "synchronous"), ("02-throughput", "throughput"), ("03-constant", "constant"),
                     ("04-constant", "constant")]
    low, high = (b["achieved_rate"] for b in doc["benchmarks"][:2])
    offered = [b["offered_rate"] for b in doc["benchmarks"][2:]]
    assert low <= 10 < 20 < high and offered == pytest.approx([(low + high) / 2, high])
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["rate_type"] == "sweep" and report["config"]["benchmarks"] == 4
    assert [b["summary"]["requests"] for b in report["benchmarks"]] == [5] * 4
    assert all(b["summary"]["ttft_ms"]["p50"] >= 100 for b in report["benchmarks"])
    page = Page((tmp_path / "report.html").read_text())
    table = page.tables["benchmarks"]
    assert table[0][:5] == ["#", "rate type", "offered", "achieved", "output tok/s"] and table[0][-1] == "goodput"
    assert [row[1] for row in table[1:]] == ["synchronous", "throughput", "constant", "constant"]
    titled = {svg["title"]: svg for svg in page.svgs}
    assert titled["TTFT against achieved rate"]["slo"] == 1 and titled["E2E against achieved rate"]["slo"] == 0
    for directory, _ in kinds:  # each benchmark's own report, which compare takes
        assert (tmp_path / directory / "report.html").is_file()
    refused = run_bench("compare", tmp_path / "report.json", tmp_path / "03-constant" / "report.json")
    assert refused.exit_code == 1 and "is a sweep's report of 4 benchmarks; compare one benchmark's own" in \
        " ".join(refused.stderr.split())
    compared = run_bench("compare", tmp_path / "03-constant" / "report.json", tmp_path / "04-constant" / "report.json",
                         "--allow-different-workloads")
    assert compared.exit_code == 0 and "profile.rate" in compared.output


@needs_locust
def test_a_sweep_whose_requests_all_fail_stops_after_two_and_exits_3(stub, run_bench, tmp_path):
    """The stub answers 400 to a request that does not stream: no rate to sweep between, every request failed."""
    result = run_bench("serve", "--url", stub(), "--model", "stub", "--rate-type", "sweep", "--num-prompts", 2,
                       "--extra-body", '{"stream": false}', "--out", tmp_path)
    assert result.exit_code == 3, result.output
    assert "the sweep ends after 2 of its 10 benchmarks" in " ".join(result.stdout.split())
    assert result.stderr.strip().splitlines()[-1].startswith("error: every one of the 4 requests failed: 4 × http_400")
    assert len(json.loads((tmp_path / "report.json").read_text())["benchmarks"]) == 2


def test_an_out_directory_holding_a_sweeps_records_is_refused(run_bench, tmp_path):
    (tmp_path / "01-synchronous").mkdir()
    (tmp_path / "01-synchronous" / "records-7.jsonl").write_text("")
    result = run_bench("serve", "--url", "http://127.0.0.1:9", "--model", "m", "--rate-type", "sweep",
                       "--out", tmp_path)
    assert result.exit_code == 1 and "already holds a run's records; give another --out" in result.stderr
