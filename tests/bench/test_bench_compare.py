"""`llmctl bench compare`'s logic: workloads that differ are named (and warned about on the command line), and
a change inside both runs' 95% confidence intervals is marked as noise, not as better or worse."""

from __future__ import annotations

import json
import random

import pytest

from llmctl.bench.compare import compare, workload_mismatches
from llmctl.bench.metrics import summarize
from llmctl.bench.record import Record
from llmctl.bench.report import write_json

PROFILE = {"kind": "rate", "rate": 4.0, "burstiness": 1.0, "duration": 60.0, "requests": None, "warmup": 0}
CONFIG = {"url": "http://a", "endpoint": "/v1/completions", "model": "m", "workers": 1, "dataset": "random", "input_len": "128",
          "output_len": "128", "prompts": None, "shared_prefix": 0, "ignore_eos": False, "profile": PROFILE}


def report(ttft_ms: float, n: int = 400, seed: int = 0, **config) -> dict:
    """A run whose TTFTs scatter ±10 ms around ttft_ms, as report.load gives it back."""
    rng = random.Random(seed)
    records = [Record(id=i, start=i * 0.25, ttft=(ttft_ms + rng.uniform(-10, 10)) / 1000, itl=[0.02] * 9,
                      e2e=ttft_ms / 1000 + 0.2, output_tokens=10) for i in range(n)]
    return {"config": {**CONFIG, **config}, "summary": summarize(records), "records": []}


def test_same_workload_has_no_mismatch_and_run_length_does_not_count():
    longer = report(100, profile={**PROFILE, "duration": 600.0, "requests": 50}, url="http://b", workers=4)
    assert workload_mismatches(report(100), longer) == []


def test_different_workloads_are_named():
    other = report(100, input_len="uniform:64,256", model="m2", dataset="sharegpt", profile={**PROFILE, "rate": 8.0})
    other["summary"]["slo_s"] = {"ttft": 0.2}
    assert workload_mismatches(report(100), other) == [
        "model: A 'm', B 'm2'", "dataset: A 'random', B 'sharegpt'", "input_len: A '128', B 'uniform:64,256'", "profile.rate: A 4.0, B 8.0",
        "slo: A None, B {'ttft': 0.2}"]
    result = compare(report(100), other)
    assert result.lines()[0].startswith("WARNING: the runs used different workloads")
    assert "profile.rate: A 4.0, B 8.0" in result.lines()[0]


def test_a_change_inside_the_noise_band_is_noise():
    few_a, few_b = report(100, n=40, seed=1), report(101, n=40, seed=2)  # 1% apart; intervals of ±2 ms or so
    rows = {r.metric: r for r in compare(few_a, few_b).rows}
    p50 = rows["TTFT P50 ms"]
    assert p50.ci_a[0] <= p50.a <= p50.ci_a[1] and p50.verdict == "noise"
    assert rows["TTFT mean ms"].verdict == "noise"
    assert "(noise)" in next(line for line in compare(few_a, few_b).lines() if line.startswith("TTFT P50 ms"))
    many = {r.metric: r for r in compare(report(100, seed=1), report(101, seed=2)).rows}
    assert many["TTFT mean ms"].verdict == "worse"  # with 400 samples a side the same 1% is past the noise
    rows = {r.metric: r for r in compare(report(100, seed=1), report(150, seed=2)).rows}
    assert rows["TTFT P50 ms"].verdict == "worse" and rows["TTFT P50 ms"].change == pytest.approx(0.5, abs=0.05)
    assert rows["E2E mean ms"].verdict == "worse"
    rows = {r.metric: r for r in compare(report(150, seed=1), report(100, seed=2)).rows}
    assert rows["TTFT P99 ms"].verdict == "better" and rows["requests/s"].verdict == "same"


def test_old_reports_get_their_intervals_from_their_records(tmp_path):
    records = [Record(id=i, start=float(i), ttft=0.1 + 0.001 * i, e2e=0.5, output_tokens=2) for i in range(50)]
    summary = summarize(records)
    summary["ttft_ms"] = {k: v for k, v in summary["ttft_ms"].items() if k != "ci95"}  # as an older llmctl wrote
    for key in ("tpot_ms", "itl_ms", "e2e_ms"):
        summary[key] = None
    write_json(tmp_path / "old.json", CONFIG, summary, [], records)
    old = json.loads((tmp_path / "old.json").read_text())
    row = next(r for r in compare(old, old).rows if r.metric == "TTFT P90 ms")
    assert row.ci_a and row.verdict == "same"


def test_cli_refuses_different_workloads_unless_told(run_bench, tmp_path):
    for name, data in (("a", report(100)), ("b", report(100, output_len="256"))):
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    refused = run_bench("compare", tmp_path / "a.json", tmp_path / "b.json")
    assert refused.exit_code == 1
    said = " ".join(refused.output.split())
    assert "the runs used different workloads" in said and "output_len" in said
    assert "pass --allow-different-workloads to compare them anyway" in said
    result = run_bench("compare", tmp_path / "a.json", tmp_path / "b.json", "--allow-different-workloads")
    assert result.exit_code == 0, result.output
    assert "WARNING: the runs used different workloads" in result.output and "A 95% CI" in result.output
