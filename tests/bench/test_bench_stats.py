"""The report's statistics on records whose answers are known: min, max, std and every percentile of a latency,
output tokens/s per second with its peak, requests in flight over time, error causes, and the run's metadata."""

from __future__ import annotations

import json
import random
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

import llmctl
from llmctl.bench.metrics import summarize
from llmctl.bench.record import Record
from llmctl.bench.report import run_meta, server_version, write_json


def test_latency_statistics_in_report_json(tmp_path):
    ms = list(range(1, 101))
    random.Random(0).shuffle(ms)  # order must not matter
    records = [Record(id=i, start=float(i), ttft=v / 1000, e2e=v / 1000 + 1.0, output_tokens=1)
               for i, v in enumerate(ms)]
    write_json(tmp_path / "report.json", {}, summarize(records), [], records, {"llmctl": "x"})
    data = json.loads((tmp_path / "report.json").read_text())
    ttft = data["summary"]["ttft_ms"]
    assert data["meta"] == {"llmctl": "x"}
    assert (ttft["min"], ttft["max"], ttft["n"]) == (pytest.approx(1.0), pytest.approx(100.0), 100)
    assert ttft["mean"] == pytest.approx(50.5) and ttft["std"] == pytest.approx((9999 / 12) ** 0.5)
    # numpy's linear interpolation between order statistics: rank q * (n - 1)
    assert [ttft[k] for k in ("p50", "p90", "p95", "p99", "p99.9")] == \
        pytest.approx([50.5, 90.1, 95.05, 99.01, 99.901])
    assert data["summary"]["e2e_ms"]["min"] == pytest.approx(1001.0)
    ci = ttft["ci95"]
    half = 1.959964 * (9999 / 12 * 100 / 99) ** 0.5 / 10  # z * sample std / sqrt(n)
    assert ci["mean"] == pytest.approx([50.5 - half, 50.5 + half])
    assert ci["p50"][0] < 50.5 < ci["p50"][1] and ci["p99.9"][1] == pytest.approx(100.0)
    assert data["summary"]["tpot_ms"] is None  # one-token answers have no TPOT


def timed_records() -> list[Record]:
    """A: 5 tokens at 0.1..0.9 s, ends 1.0. B: 10 tokens at 1.05..1.95, ends 2.0. C: 4 tokens (usage) in 2 events
    at 2.1 and 2.6, ends 3.0. A warm-up before them all counts nowhere."""
    return [Record(id=0, start=-5.0, ttft=0.1, itl=[0.1] * 50, e2e=5.2, output_tokens=51, warmup=True),
            Record(id=1, start=0.0, ttft=0.1, itl=[0.2] * 4, e2e=1.0, output_tokens=5),
            Record(id=2, start=0.5, ttft=0.55, itl=[0.1] * 9, e2e=1.5, output_tokens=10),
            Record(id=3, start=1.2, ttft=0.9, itl=[0.5], e2e=1.8, output_tokens=4, tokens_from="usage", events=2)]


def test_peak_output_throughput_over_one_second_windows():
    s = summarize(timed_records())
    assert s["series"]["window_s"] == 1.0
    assert s["series"]["output_tokens_per_s"] == pytest.approx([5.0, 10.0, 4.0])
    assert s["peak_output_throughput"] == pytest.approx(10.0)
    assert s["output_throughput"] == pytest.approx(19 / 3.0)  # the mean over the measured window


def test_concurrency_series_from_starts_and_ends():
    s = summarize(timed_records())
    flight = s["series"]["concurrency"]
    assert flight["t"] == pytest.approx([0.0, 0.5, 1.0, 1.2, 2.0, 3.0])
    assert flight["in_flight"] == [1, 2, 1, 2, 1, 0]
    assert s["peak_concurrency"] == 2 and s["start"] == 0.0
    assert s["mean_concurrency"] == pytest.approx((0.5 * 1 + 0.5 * 2 + 0.2 * 1 + 0.8 * 2 + 1.0 * 1) / 3.0)


def test_error_causes_group_by_status_and_message_without_numbers():
    records = [Record(id=i, start=float(i), e2e=0.1, status="http_400",
                      error=f"the prompt has {1000 + i} tokens, max 1024") for i in range(3)]
    records += [Record(id=3, start=3.0, status="timeout", error="no answer in 300 s", e2e=300.0),
                Record(id=4, start=4.0, ttft=0.1, e2e=0.2, output_tokens=2),
                Record(id=5, start=0.0, status="connection", error="refused", warmup=True)]
    assert summarize(records)["error_causes"] == [
        {"status": "http_400", "message": "the prompt has # tokens, max #",
         "example": "the prompt has 1000 tokens, max 1024", "count": 3},
        {"status": "timeout", "message": "no answer in # s", "example": "no answer in 300 s", "count": 1}]


def test_run_metadata():
    meta = run_meta([Record(id=0, start=1_790_000_000.0), Record(id=1, start=1_790_000_005.0)], "m",
                    {"version": "0.9"})
    assert meta["started_at"] == "2026-09-21T14:13:20+00:00"
    assert meta["llmctl"] == llmctl.__version__ and meta["model"] == "m" and meta["server_version"] == {"version": "0.9"}
    assert meta["python"].count(".") == 2 and meta["platform"] and meta["written_at"].endswith("+00:00")


class _Version(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        body, status = (b'{"version": "0.9.1"}', 200) if self.path == "/version" else (b"no", 404)
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_server_version_is_best_effort():
    server = HTTPServer(("127.0.0.1", 0), _Version)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        assert server_version(url + "/") == {"version": "0.9.1"}
        assert server_version(url + "/nothing-here") is None  # 404
    finally:
        server.shutdown()
        server.server_close()
    assert server_version(url, timeout=0.5) is None  # nothing listens any more
