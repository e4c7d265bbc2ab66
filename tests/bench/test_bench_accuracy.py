"""The bench measures what a server does: against a stub with scripted delays, the measured TTFT, ITL and E2E
percentiles are within 5% of the scripted ones (P99 within 10%); open-loop arrivals come at the asked rate, two
workers share a request count exactly, and stepped rates stop where the server saturates."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

# Only find it: importing locust would patch this process with gevent.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="needs locust (llmctl[bench])")

# Cycled per request / per token by the stub. On a busy 2-core machine the OS now and then wakes the stub
# or locust 5-20 ms late; gaps of 100 ms and more, and enough of them (640) that P99 is not decided by one
# such stall, keep every percentile below P99 within 5% (worst seen: +2.8%, at load average 5.5).
TTFT_MS = [200.0, 300.0, 400.0, 500.0]
ITL_MS = [100.0, 200.0]
TOKENS = 6
WARMUP, REQUESTS, USERS = 32, 128, 32


def percentiles(ms: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(ms)), **{f"p{p}": float(np.percentile(ms, p)) for p in (50, 90, 95, 99)}}


def test_measured_latencies_match_the_scripted_ones(stub, run_bench, tmp_path):
    url = stub(",".join(map(str, TTFT_MS)), ",".join(map(str, ITL_MS)))
    result = run_bench("serve", "--url", url, "--model", "stub", "--requests", REQUESTS,
                       "--warmup", WARMUP, "--concurrency", USERS, "--output-len", TOKENS, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    summary, records = report["summary"], [r for r in report["records"] if not r["warmup"]]
    assert summary["requests"] == summary["ok"] == len(records) == REQUESTS
    assert summary["output_tokens"] == REQUESTS * TOKENS
    # The stub hands TTFTs out in arrival order. Which 128 of its 160 requests are the measured ones depends
    # on when each user's warm-up reaches it (a busy machine can delay one past a measured request), so each
    # measured request's scripted TTFT is the level its measurement is nearest to: a level is 100 ms from the
    # next, far beyond any measuring error, and the counts stay near 32 each.
    gaps = [ITL_MS[k % len(ITL_MS)] for k in range(TOKENS - 1)]
    levels = [min(TTFT_MS, key=lambda level, r=r: abs(1000 * r["ttft"] - level)) for r in records]
    assert all(abs(levels.count(level) - REQUESTS // len(TTFT_MS)) <= 4 for level in TTFT_MS), levels
    scripted = {"ttft_ms": percentiles(levels),
                "itl_ms": percentiles(gaps * REQUESTS),
                "e2e_ms": percentiles([t + sum(gaps) for t in levels])}
    for metric, want in scripted.items():
        for stat, value in want.items():
            got = summary[metric][stat]
            # P99 of ITL is the 7th-latest of 640 gaps: a handful of late wake-ups on a busy machine move it
            # (+8% seen once in CI), while a measuring error would move every percentile. It gets 10%.
            tol = 0.10 if stat == "p99" else 0.05
            assert abs(got - value) <= tol * value, f"{metric} {stat}: measured {got:.2f} ms, scripted {value:.2f} ms"
    assert summary["tpot_ms"]["p50"] == pytest.approx(sum(gaps) / len(gaps), rel=0.05)


def test_open_loop_rate_with_two_workers_and_an_exact_request_count(stub, run_bench, tmp_path):
    rate, requests, warmup = 60.0, 120, 4
    result = run_bench("serve", "--url", stub(), "--model", "stub", "--request-rate", rate,
                       "--requests", requests, "--warmup", warmup, "--concurrency", 16, "--output-len", 4,
                       "--workers", 2, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert len(list(tmp_path.glob("records-*.jsonl"))) == 2  # one file per worker process
    report = json.loads((tmp_path / "report.json").read_text())
    records = report["records"]
    assert sorted(r["id"] for r in records) == list(range(requests + warmup))  # dealt over both, none lost
    assert sum(r["warmup"] for r in records) == warmup and report["summary"]["error_rate"] == 0
    # The two workers' arrivals merge into one Poisson process at the full rate: gaps exponential, CV 1.
    # 123 gaps: the mean is within 30% of 1/rate at 3.3 standard deviations.
    gaps = np.diff(sorted(r["start"] for r in records))
    assert np.mean(gaps) == pytest.approx(1 / rate, rel=0.3)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1.0, abs=0.3)


@pytest.mark.slow
def test_stepped_rates_rise_until_the_server_saturates(stub, run_bench, tmp_path):
    """Each request holds a user 100 ms and 4 users are allowed in flight: the server side tops out near
    40 requests/s, so rates of 10, 20, 30, ... stop well before its max rate of 200."""
    result = run_bench("serve", "--url", stub("100"), "--model", "stub", "--rate-type", "stepped", "--request-rate", 10,
                       "--step-duration", 2, "--max-rate", 200, "--concurrency", 4, "--output-len", 1,
                       "--out", tmp_path)
    assert result.exit_code == 0, result.output
    steps = json.loads((tmp_path / "report.json").read_text())["steps"]
    offered = [s["offered_rate"] for s in steps]
    assert offered[:3] == [10, 20, 30] and 40 <= offered[-1] <= 70
    assert steps[0]["request_throughput"] == pytest.approx(10, rel=0.35)
    assert max(s["request_throughput"] for s in steps) <= 42
    assert "throughput against offered load" in (tmp_path / "report.html").read_text()


@pytest.mark.slow
def test_spike_and_ramp_change_the_requests_in_flight(stub, run_bench, tmp_path):
    url = stub("100")  # each request holds its user 100 ms: users in flight ~ concurrency

    def peak(out, lo: float, hi: float) -> int:
        """Most requests in flight at once between lo and hi seconds into the run."""
        records = json.loads((out / "report.json").read_text())["records"]
        t0 = min(r["start"] for r in records)
        times = [lo + (hi - lo) * k / 50 for k in range(51)]
        return max(sum(r["start"] - t0 <= t < r["start"] - t0 + r["e2e"] for r in records) for t in times)

    spike = tmp_path / "spike"
    result = run_bench("serve", "--url", url, "--model", "stub", "--rate-type", "spike", "--max-concurrency", 1,
                       "--spike-users", 6, "--spike-at", 1, "--spike-for", 2, "--duration", 4, "--output-len", 1,
                       "--out", spike)
    assert result.exit_code == 0, result.output
    assert [peak(spike, 0.2, 0.8), peak(spike, 1.8, 2.2), peak(spike, 3.4, 3.8)] == [1, 6, 1]
    ramp = tmp_path / "ramp"
    result = run_bench("serve", "--url", url, "--model", "stub", "--rate-type", "ramp", "--ramp-from", 1,
                       "--max-concurrency", 9, "--duration", 4, "--output-len", 1, "--out", ramp)
    assert result.exit_code == 0, result.output
    assert peak(ramp, 0.2, 0.8) <= 3 and peak(ramp, 3.2, 3.8) >= 7
