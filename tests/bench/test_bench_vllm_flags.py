"""vLLM's flags and GuideLLM's rate types: what reaches the server, measured from the records (requests in
flight, arrival gaps), the model taken from /v1/models, vLLM's result file, and each bad value refused in one
line before any load."""

from __future__ import annotations

import importlib.util
import json
import socket

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("locust") is None, reason="needs locust (llmctl[bench])")


def records(out) -> list[dict]:
    return json.loads((out / "report.json").read_text())["records"]


def peak_in_flight(rs: list[dict]) -> int:
    """Most requests in flight at once: +1 at each start, -1 at each end (an end before a start at a tie)."""
    events = sorted([(r["start"], 1) for r in rs] + [(r["start"] + r["e2e"], -1) for r in rs])
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def test_max_concurrency_caps_what_is_in_flight_and_the_result_file_is_vllms(stub, run_bench, tmp_path):
    result = run_bench("serve", "--base-url", stub("200"), "--model", "stub", "--num-prompts", 8,
                       "--max-concurrency", 2, "--output-len", 1, "--out", tmp_path, "--save-result",
                       "--result-filename", "r.json", "--percentile-metrics", "ttft,e2el",
                       "--metric-percentiles", "50,90", "--goodput", "ttft:1000", "e2el:100")
    assert result.exit_code == 0, result.output
    rs = records(tmp_path)
    assert len(rs) == 8 and peak_in_flight(rs) == 2
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["completed"] == 8 and saved["max_concurrency"] == 2 and saved["request_rate"] == "inf"
    assert saved["p50_ttft_ms"] == pytest.approx(200, rel=0.25) and "p90_e2el_ms" in saved
    assert "p99_ttft_ms" not in saved and "mean_itl_ms" not in saved
    assert saved["request_goodput"] == 0  # every E2E is over 100 ms
    assert "P90" in result.output and "E2EL" in result.output


def test_an_infinite_rate_without_a_cap_sends_every_request_at_once(stub, run_bench, tmp_path):
    result = run_bench("serve", "--base-url", stub("300"), "--model", "stub", "--num-prompts", 6, "--output-len", 1,
                       "--out", tmp_path)
    assert result.exit_code == 0, result.output
    rs = records(tmp_path)
    assert len(rs) == 6 and peak_in_flight(rs) == 6


def test_synchronous_sends_one_at_a_time(stub, run_bench, tmp_path):
    result = run_bench("serve", "--base-url", stub("100"), "--model", "stub", "--rate-type", "synchronous",
                       "--num-prompts", 4, "--output-len", 1, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert peak_in_flight(records(tmp_path)) == 1


def test_constant_rate_type_spaces_arrivals_evenly(stub, run_bench, tmp_path):
    rate = 20.0
    result = run_bench("serve", "--base-url", stub(), "--model", "stub", "--rate-type", "constant",
                       "--request-rate", rate, "--num-prompts", 30, "--output-len", 1, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    gaps = np.diff(sorted(r["start"] for r in records(tmp_path)))
    # Poisson arrivals would have a coefficient of variation of 1; fixed gaps have one near 0.
    assert np.mean(gaps) == pytest.approx(1 / rate, rel=0.15) and np.std(gaps) / np.mean(gaps) < 0.3


def test_the_model_is_the_first_the_server_lists(stub, run_bench, tmp_path):
    result = run_bench("serve", "--base-url", stub(model="tiny"), "--num-prompts", 2, "--output-len", 1,
                       "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "no --model: benching 'tiny', the first model" in result.output
    assert json.loads((tmp_path / "report.json").read_text())["config"]["model"] == "tiny"


def test_a_server_that_lists_no_model_needs_model(run_bench, canned_server, tmp_path):
    url = canned_server({"GET": (200, b'{"object": "list", "data": []}')})
    out = tmp_path / "out"
    result = run_bench("serve", "--base-url", url, "--num-prompts", 1, "--out", out)
    refused(result, out, "/v1/models lists no model; give --model")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refused(result, out, message: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--endpoint", "chat"], "--endpoint is the API path, /v1/completions or /v1/chat/completions, got 'chat'; "
                             "use --endpoint /v1/chat/completions"),
    (["--rate-type", "bursty"], "unknown --rate-type 'bursty'"),
    (["--rate-type", "concurrent"], "--rate-type concurrent needs --max-concurrency"),
    (["--rate-type", "poisson"], "--rate-type poisson needs a finite --request-rate"),
    (["--rate-type", "constant", "--request-rate", 4, "--burstiness", 0.5], "--burstiness shapes --request-rate"),
    (["--rate-type", "synchronous", "--max-concurrency", 4], "synchronous sends one request at a time"),
    (["--max-concurrency", 0], "--max-concurrency must be at least 1"),
    (["--burstiness", 0], "--request-rate and --burstiness must be positive"),
    (["--goodput", "ttft"], "bad --goodput 'ttft': use ttft|tpot|e2el:MILLISECONDS"),
    (["--goodput", "ttft:100", "e2e:5"], "bad --goodput 'e2e:5'"),
    (["--percentile-metrics", "ttft,lag"], "bad --percentile-metrics 'ttft,lag'"),
    (["--metric-percentiles", "50,101"], "bad --metric-percentiles '50,101'"),
    (["--dataset-name", "sharegpt"], "--dataset-path goes with --dataset-name sharegpt or trace"),
    (["--dataset-name", "sonnet", "--dataset-path", "x"], "unknown --dataset-name 'sonnet'"),
    (["stray"], "unexpected argument 'stray'"),
])
def test_bad_values_are_one_line(run_bench, tmp_path, args, message):
    out = tmp_path / "out"
    result = run_bench("serve", "--base-url", f"http://127.0.0.1:{free_port()}", "--model", "m", "--out", out, *args)
    refused(result, out, message)
