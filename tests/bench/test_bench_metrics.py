"""Aggregation: percentiles, throughput window, goodput, errors kept, warm-up left out, stepped rates."""

from __future__ import annotations

import pytest

from llmctl.bench.metrics import parse_slo, rate_steps, summarize
from llmctl.bench.record import Record


def rec(i, start, ttft, e2e, out=11, status="ok", warmup=False, **kw):
    return Record(id=i, start=start, ttft=ttft, e2e=e2e, itl=[(e2e - ttft) / (out - 1)] * (out - 1) if ttft else [],
                  output_tokens=out, prompt_tokens=5, status=status, warmup=warmup, **kw)


def test_summary_counts_errors_leaves_out_warmup_and_measures_the_window():
    records = [rec(0, 0.0, 9.0, 9.5, warmup=True)]  # slow warm-up: must not show anywhere
    records += [rec(i, 10.0 + i, 0.1 * i, 0.1 * i + 1.0) for i in range(1, 11)]
    records += [Record(id=11, start=12.0, status="http_500", error="boom", e2e=0.01),
                Record(id=12, start=13.0, status="timeout", e2e=5.0)]
    s = summarize(records)
    assert (s["requests"], s["ok"], s["warmup"]) == (12, 10, 1)
    assert s["errors"] == {"http_500": 1, "timeout": 1} and s["error_rate"] == pytest.approx(2 / 12)
    assert s["duration_s"] == pytest.approx(22.0 - 11.0)  # first start 11, last end 20 + 2.0
    ttfts = [100.0 * i for i in range(1, 11)]
    assert s["ttft_ms"]["mean"] == pytest.approx(sum(ttfts) / 10)
    assert s["ttft_ms"]["p50"] == pytest.approx(550.0) and s["ttft_ms"]["p90"] == pytest.approx(910.0)
    assert s["tpot_ms"]["p50"] == pytest.approx(100.0) and s["itl_ms"]["n"] == 100
    assert s["output_tokens"] == 110 and s["prompt_tokens"] == 50
    assert s["request_throughput"] == pytest.approx(10 / 11.0)
    assert s["output_throughput"] == pytest.approx(110 / 11.0)


def test_goodput_against_slos():
    records = [rec(i, float(i), ttft, ttft + 1.0) for i, ttft in enumerate([0.05, 0.1, 0.3, 0.5])]
    records.append(Record(id=9, start=1.0, status="connection", e2e=0.1))
    s = summarize(records, parse_slo("ttft=200ms,tpot=0.2s"))
    assert s["good_share"] == pytest.approx(2 / 5)  # the failed request is in the denominator, never good
    assert s["goodput"] == pytest.approx(2 / s["duration_s"])
    assert parse_slo("e2e=2s, ttft=150") == {"e2e": 2.0, "ttft": 0.15}
    with pytest.raises(ValueError, match="bad SLO 'latency=3'"):
        parse_slo("latency=3")


def test_rate_steps_report_completions_per_step_window():
    records = []
    for step, rate in enumerate([1.0, 2.0]):
        n = int(rate * 10)
        records += [rec(100 * step + i, step * 10 + i * 10 / n, 0.1, 0.5, step=step, offered_rate=rate)
                    for i in range(n)]
    steps = rate_steps(records, step_duration=10.0)
    assert [s["offered_rate"] for s in steps] == [1.0, 2.0]
    assert steps[0]["request_throughput"] == pytest.approx(1.0)
    assert steps[1]["requests"] == 20 and steps[1]["ttft_p50_ms"] == pytest.approx(100.0)
